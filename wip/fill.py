"""Fill the README results template from benchmarks/results/mini8.json (v3)."""
import json, re, sys
from pathlib import Path
import torch
R = Path("/work/pool-v3/benchmarks/results")
rows = json.load(open(R / "mini8.json"))
EXPERTS = 85.6
def slug(spec):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.replace(" ", "__"))[:120]
def m(spec): return 100 * rows[spec]["mean_accuracy"]
TA = round(m("task_arithmetic"), 1)
def g(spec):
    v = (round(m(spec), 1) - TA) / (EXPERTS - TA) * 100
    return f"{v:+.1f}%".replace("-", "−")
def lam(spec):
    p = R / "runs" / slug(spec) / "coefficients.json"
    l = torch.tensor(json.load(open(p))["lambdas"])
    s = f"{l.min():.2f} / {l.mean():.2f} / {l.max():.2f}".replace("-", "−")
    at0 = float((l <= 1e-6).float().mean())
    return s + (f" ({at0:.0%} at 0)" if at0 >= 0.05 else "")
def hp(spec, key):
    r = json.load(open(R / "runs" / slug(spec) / "results.json"))
    return str(r["method_info"]["hyperparameters"][key])
NAMES = {"ties": "TIES", "dare": "DARE", "della": "DELLA", "consensus": "Consensus", "lines": "LiNeS", "iso_c": "Iso-C",
         "iso_cts": "Iso-CTS", "pcb": "PCB", "regmean": "RegMean", "fisher_merging": "Fisher", "opcm": "OPCM",
         "task_arithmetic": "task arithmetic", "simple_average": "simple average"}
text = open(sys.argv[1]).read()
extra = json.load(open(sys.argv[2])) if len(sys.argv) > 2 else {}
static = sorted((s for s in NAMES if s in rows), key=m, reverse=True)
extra.setdefault("static_ranking", ", ".join(f"{NAMES[s]} {m(s):.1f}" for s in static))
extra.setdefault("ta_gap", f"{EXPERTS - TA:.1f}")
table = (R / "mini8.md").read_text().strip() if (R / "mini8.md").exists() else "TABLE"
extra.setdefault("table", table)
def sub(match):
    body = match.group(1)
    kind, _, rest = body.partition(":")
    if kind == "m": return f"{m(rest):.1f}"
    if kind == "g": return g(rest)
    if kind == "l": return lam(rest)
    if kind == "hp":
        spec, key = rest.rsplit(":", 1); return hp(spec, key)
    return str(extra[body])
missing = []
def safe(match):
    try:
        return sub(match)
    except (KeyError, FileNotFoundError) as e:
        missing.append(match.group(1)); return "{" + match.group(1) + "}"
out = re.sub(r"\{([a-z_]+(?::[^{}]+)?)\}", safe, text)
print(out)
print("MISSING", missing, file=sys.stderr)
