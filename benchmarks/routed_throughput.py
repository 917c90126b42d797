"""Routed-merge evaluation throughput on CPU: WEMoE, sparse WEMoE and SMEAR versus one plain model, and peak memory.

    python benchmarks/routed_throughput.py [--model fusion-mini8-vit] [--batch 256] [--repeats 5] [--threads 1]
        [--device cpu|cuda] [--form auto|experts|weights]   # GPU: --model ViT-B-32 --device cuda --parts throughput
        [--parts throughput memory linear]   # a subset keeps the other parts from --out (shorter runs)

*Throughput*: images/s of a forward pass only (``torch.no_grad``, eval mode, so every sample is routed to its own
merged MLP weights) at ``--batch`` images of the model's size, for K = 2, 4, 8 experts, against ONE plain model (the
pretrained encoder) at the same batch. The models are timed round-robin (plain, WEMoE, sparse WEMoE, SMEAR, plain, ...)
after one warm-up pass each, so load from other processes hits them alike; the median of ``--repeats`` is reported
and the ratio ``routed / plain`` (issue target ≥ 0.5×).
*Memory*: each K (and the plain model) runs in a fresh subprocess: ``peak_rss_mib`` is the whole process' peak
(``ru_maxrss``: construction from K expert state dicts included), ``resident_mib`` the RSS once the model is built
and the expert dicts freed, ``inference_peak_mib`` the peak during one forward at ``--batch`` (VmHWM reset via
``/proc/self/clear_refs`` before it; equals ``peak_rss_mib`` where the kernel refuses the reset), and
``inference_extra_mib`` that peak minus ``baseline_mib``, the RSS after the imports, the encoder and the input
batch exist (≈1 GiB of it is libraries, which all variants share).
*Linear*: where the time goes, on one routed linear of the model's first MLP (``c_fc``: tokens ``[batch, T, d]``):
a plain ``F.linear`` against ``torch.bmm`` over the batch in the ``"weights"`` form's chunks, all reading ONE chunk
of weights built beforehand (still in cache: the floor of that form, building excluded), and each form in full,
for K = 2, 4, 8 (median ms, interleaved like the throughput).
Random weights (no pool needed); K seeded perturbations ``θ_0 + 0.01·ε`` are the experts. Ratios are measured in
one run; absolute times vary several-fold on shared CPUs.
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KS = (2, 4, 8)
ROUTED = ("wemoe", "sparse_wemoe", "smear")


def image_size(encoder) -> int:
    return encoder.image_size[0] if isinstance(encoder.image_size, tuple) else encoder.image_size


def base_encoder(model_name: str):
    from fusion.pools.openclip import create_clip

    torch.manual_seed(0)
    return create_clip(model_name).visual.eval()


def task_vectors(encoder, k: int) -> dict:
    """Stacked task vectors of K seeded perturbations of ``encoder`` (the experts are freed on return)."""
    from fusion.merge.task_vectors import stack_task_vectors

    gen = torch.Generator().manual_seed(1)
    base = {n: p.detach() for n, p in encoder.state_dict().items()}
    experts = [{n: v + 0.01 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for n, v in base.items()}
               for _ in range(k)]
    return stack_task_vectors(base, experts)


def routed_models(encoder, k: int, names=ROUTED, form: str = "auto") -> dict:
    from fusion.param import routed

    tv = task_vectors(encoder, k)
    return {name: getattr(routed, name)(encoder, tv, init=0.3, form=form).eval() for name in names}


def timed(run, cuda: bool) -> float:
    """Seconds of one ``run()`` (CUDA: synchronised before and after)."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def round_robin(runs: dict, repeats: int, cuda: bool) -> dict[str, float]:
    """Median seconds of each ``runs[name]()``: one warm-up each, then ``repeats`` rounds in turn (no grad)."""
    times = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                times[name].append(timed(run, cuda))
    return {name: statistics.median(ts) for name, ts in times.items()}


def throughput(model_name: str, batch: int, repeats: int, ks=KS, device: str = "cpu", form: str = "auto") -> dict:
    encoder = base_encoder(model_name)  # stays on the CPU: the routed models are built from it
    plain = copy.deepcopy(encoder).to(device)
    size = image_size(encoder)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2)).to(device)
    out = {}
    for k in ks:
        models = {"plain": plain, **{n: m.to(device) for n, m in routed_models(encoder, k, form=form).items()}}
        med = round_robin({name: functools.partial(m, x) for name, m in models.items()}, repeats, x.is_cuda)
        row = {"images_per_s": {name: batch / t for name, t in med.items()},
               "ratio_to_plain": {name: med["plain"] / med[name] for name in ROUTED}}
        out[k] = row
        print(f"K={k}  " + "  ".join(f"{n} {v:.0f} img/s" for n, v in row["images_per_s"].items()), flush=True)
        del models
        gc.collect()
    return out


def linear_parts(model_name: str, batch: int, repeats: int, ks=KS, device: str = "cpu") -> dict:
    """Median ms of one routed ``c_fc`` linear: plain, ``bmm`` on cached prebuilt weights, and the two forms."""
    import torch.nn.functional as F

    from fusion.param.routers import routed_linear_experts, routed_linear_weights, weights_chunk

    encoder = base_encoder(model_name)
    fc = encoder.transformer.resblocks[0].mlp.c_fc
    gen = torch.Generator().manual_seed(3)
    tokens = (image_size(encoder) // encoder.conv1.kernel_size[0]) ** 2 + 1
    x = torch.randn(batch, tokens, fc.in_features, generator=gen).to(device)
    w0, b0 = fc.weight.detach().to(device), fc.bias.detach().to(device)
    out = {}
    for k in ks:
        tw = (0.01 * torch.randn(k, *w0.shape, generator=gen)).to(device)
        r = torch.randn(batch, k, generator=gen).to(device)
        chunk = weights_chunk(x, w0)
        built = (w0 + torch.einsum("bk,koi->boi", r[:chunk], tw)).transpose(1, 2)  # the form's layout
        runs = {"plain": lambda: F.linear(x, w0, b0),
                "bmm_cached": lambda: [torch.bmm(xc, built[:len(xc)]) for xc in x.split(chunk)],
                "weights": lambda: routed_linear_weights(x, w0, b0, tw, None, r),
                "experts": lambda: routed_linear_experts(x, w0, b0, tw, None, r)}
        out[k] = {name: 1e3 * t for name, t in round_robin(runs, repeats, x.is_cuda).items()}
        print(f"K={k} one c_fc linear, ms: " + "  ".join(f"{n} {v:.1f}" for n, v in out[k].items()), flush=True)
    return out


def rss_kib(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def phase_peak(run) -> tuple[int, int, int]:
    """Run ``run()`` after resetting the peak-RSS counter; returns (resident, process peak, phase peak) in KiB."""
    gc.collect()
    resident = rss_kib("VmRSS") or 0
    has_reset = reset_peak()
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return resident, peak, (rss_kib("VmHWM") if has_reset else peak)


def run_child(module: str, call: str, threads: int) -> dict:
    """``benchmarks.<module>.<call>`` in a fresh Python process (its own peak RSS); returns its JSON result."""
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); import torch; torch.set_num_threads({threads});"
            f"from benchmarks import {module};"
            f"print(json.dumps({module}.{call}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=900)
    return json.loads(res.stdout.strip().splitlines()[-1])


def memory(model_name: str, which: str, k: int, batch: int) -> dict:
    """Run in a fresh process: build ``which`` ("plain" or a routed factory), free the experts, one forward."""
    import fusion.merge.task_vectors  # noqa: F401  (imports before the baseline)
    import fusion.param.routed  # noqa: F401

    encoder = base_encoder(model_name)
    x = torch.randn(batch, 3, image_size(encoder), image_size(encoder))
    gc.collect()
    baseline = rss_kib("VmRSS") or 0
    model = encoder if which == "plain" else routed_models(encoder, k, (which,))[which]
    resident, peak, phase = phase_peak(torch.no_grad()(lambda: model(x)))
    return {"peak_rss_mib": peak / 1024, "baseline_mib": baseline / 1024, "resident_mib": resident / 1024,
            "inference_peak_mib": phase / 1024, "inference_extra_mib": (phase - baseline) / 1024}


def memory_child(model_name: str, which: str, k: int, batch: int, threads: int) -> dict:
    return run_child("routed_throughput", f"memory({model_name!r}, {which!r}, {k}, {batch})", threads)


def print_table(result: dict) -> None:
    thr, mem = result.get("throughput", {}), result.get("memory", {})
    plain = mem.get("plain")
    print(f"\n{result['model']}, batch {result['batch']}, {result['threads']} thread(s), median of {result['repeats']}")
    print(f"{'K':>2} {'plain img/s':>12} " + " ".join(f"{n + ' ×':>14}" for n in ROUTED)
          + f" {'WEMoE infer-peak MiB':>21} {'extra MiB (× plain)':>20}")
    for k in sorted({int(k) for k in thr} | {int(n.removeprefix("wemoe_k")) for n in mem if n != "plain"}):
        row, m = thr.get(str(k), thr.get(k)), mem.get(f"wemoe_k{k}")
        line = f"{k:>2} "
        line += (f"{row['images_per_s']['plain']:>12.0f} " + " ".join(f"{row['ratio_to_plain'][n]:>14.2f}"
                                                                    for n in ROUTED)) if row else " " * 57
        if m:
            line += (f" {m['inference_peak_mib']:>21.0f} {m['inference_extra_mib']:>8.0f}"
                     f" ({m['ratio_to_plain']['inference_extra_mib']:.1f}×)")
        print(line)
    for k, ms in result.get("linear_ms", {}).items():
        print(f"K={k}: one c_fc linear, ms (× plain): " + "  ".join(f"{n} {v:.1f} ({v / ms['plain']:.1f}×)"
                                                               for n, v in ms.items()))
    if plain:
        print(f"plain model: inference peak {plain['inference_peak_mib']:.0f} MiB "
              f"({plain['inference_extra_mib']:.0f} MiB over the {plain['baseline_mib']:.0f} MiB baseline); "
              f"process peak {plain['peak_rss_mib']:.0f} MiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fusion-mini8-vit")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (parent and children)")
    p.add_argument("--ks", type=int, nargs="+", default=list(KS))
    p.add_argument("--device", default="cpu", help="throughput part only (cpu | cuda); memory is CPU RSS")
    p.add_argument("--form", default="auto", choices=("auto", "experts", "weights"),
                   help="the routed linear's form (fusion.param.routers.routed_linear)")
    p.add_argument("--parts", nargs="+", choices=("throughput", "memory", "linear"),
                   default=["throughput", "memory", "linear"],
                   help="measure only these; the parts not named are kept from --out if it was written for the "
                        "same model and batch")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "routed_throughput.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    result = {"model": args.model, "batch": args.batch, "repeats": args.repeats, "threads": args.threads,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "form": args.form,
              "target_ratio": 0.5}
    if set(args.parts) != {"throughput", "memory", "linear"} and out.is_file():
        old = json.loads(out.read_text())
        if (old.get("model"), old.get("batch")) == (args.model, args.batch):
            result = {**old, **{key: result[key] for key in ("model", "batch", "threads", "device", "form")}}
    if "throughput" in args.parts:
        result["repeats"] = args.repeats
        result["throughput"] = throughput(args.model, args.batch, args.repeats, args.ks, args.device, args.form)
    if "linear" in args.parts:
        result["linear_repeats"] = args.repeats
        result["linear_ms"] = linear_parts(args.model, args.batch, args.repeats, args.ks, args.device)
    if "memory" in args.parts:
        plain_mem = memory_child(args.model, "plain", 0, args.batch, args.threads)
        result["memory"] = {"plain": plain_mem}
        for k in args.ks:
            mem = memory_child(args.model, "wemoe", k, args.batch, args.threads)
            mem["ratio_to_plain"] = {key: mem[key] / plain_mem[key] for key in plain_mem if key != "baseline_mib"}
            result["memory"][f"wemoe_k{k}"] = mem
    print_table(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
