"""Concrete-mask training cost on CPU: peak memory and step time versus layer-wise AdaMerging (K = 8).

    python benchmarks/concrete_memory.py [--model fusion-mini8-vit] [--batch 16] [--repeats 5] [--k 8] [--threads 1]
        [--parts time memory]   # one part alone keeps the other from --out (two shorter runs)

One training step = ``MergeTraining.task_losses`` on K task batches of ``--batch`` images (merge once, per-task
forward+backward, one backward through the merge) + one Adam step on every trainable parameter, for

- ``adamerging``: layer-wise AdaMerging, ``coefficient_merge(..., layer_wise=True)`` (λ: K × L);
- ``concrete_ta``: Concrete Task Arithmetic, ``concrete_merge(..., learn_coefficients=False)`` (mask logits: P);
- ``concrete_adamerging``: Concrete layer-wise AdaMerging's model, ``concrete_merge(..., learn_coefficients=
  "layer_wise")``, one joint step on logits and λ (P + K × L);
- ``concrete_adamerging_bilevel`` (extra): its real first-order bi-level step (:class:`fusion.train.bilevel.
  BilevelTraining` inner step on λ + outer step on the logits, each on one half of every task batch).

*Time*: median of ``--repeats`` steps after one warm-up, the methods timed round-robin in one process.
*Memory*: each method in a fresh subprocess: ``peak_rss_mib`` (``ru_maxrss``, construction from K expert state
dicts included), ``resident_mib`` once built and the experts freed, ``train_peak_mib`` the peak over two training
steps (VmHWM reset via ``/proc/self/clear_refs`` before them; the first step allocates the Adam state), and
``train_extra_mib`` that peak minus ``baseline_mib``, the RSS once the imports, the encoder and the batches exist
(≈1 GiB of libraries that every method shares): the part the merge parametrization is responsible for.
Ratios are to ``adamerging``. Random weights (no pool needed). Absolute times vary several-fold on shared CPUs.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.routed_throughput import base_encoder, image_size, phase_peak, rss_kib, run_child, task_vectors  # noqa: E402

METHODS = ("adamerging", "concrete_ta", "concrete_adamerging", "concrete_adamerging_bilevel")


def build(name: str, encoder, tv):
    from fusion.param.coefficients import coefficient_merge
    from fusion.param.concrete import concrete_merge

    if name == "adamerging":
        return coefficient_merge(encoder, tv, init=0.3, layer_wise=True)
    if name == "concrete_ta":
        return concrete_merge(encoder, tv, init=0.3, learn_coefficients=False)
    return concrete_merge(encoder, tv, init=0.3, learn_coefficients="layer_wise")


def make_step(name: str, model, data: dict):
    """``() -> None``: one training step of ``name`` on ``data`` (``{task: (images, None)}``)."""
    from fusion.train.bilevel import BilevelTraining, split_batch
    from fusion.train.module import MergeTraining
    from fusion.train.objectives import Entropy

    heads = lambda f, t: f  # noqa: E731  (features as logits: the head cost is negligible)

    if name == "concrete_adamerging_bilevel":
        class Bilevel(BilevelTraining):
            def manual_backward(self, loss, *a, **kw):
                loss.backward(*a, **kw)

        loop = Bilevel(model, heads, Entropy(), torch.optim.Adam,
                       inner_optimizer=lambda ps: torch.optim.Adam(ps, lr=1.0))
        outer = torch.optim.Adam(loop.trainable_parameters(), lr=1e-3)
        inner_batch, outer_batch = split_batch(data)

        def step():
            loop.inner_step(inner_batch)
            loop.outer_step(outer_batch, outer)
        return step

    class Loop(MergeTraining):
        def manual_backward(self, loss, *a, **kw):
            loss.backward(*a, **kw)

    loop = Loop(model, heads, Entropy(), torch.optim.Adam)
    opt = torch.optim.Adam(loop.trainable_parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loop.task_losses(data)
        opt.step()
    return step


def batches(encoder, k: int, batch: int) -> dict:
    size = image_size(encoder)
    gen = torch.Generator().manual_seed(2)
    return {f"t{i}": (torch.randn(batch, 3, size, size, generator=gen), None) for i in range(k)}


def step_times(model_name: str, k: int, batch: int, repeats: int, methods=METHODS) -> dict:
    encoder = base_encoder(model_name)
    tv = task_vectors(encoder, k)
    data = batches(encoder, k, batch)
    steps, trainable = {}, {}
    for name in methods:
        model = build(name, encoder, tv).train()
        trainable[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        steps[name] = make_step(name, model, data)
    times = {name: [] for name in methods}
    for fn in steps.values():
        fn()  # warm-up (allocates the optimizer state)
    for _ in range(repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"step_s": med, "ratio_to_adamerging": {n: t / med["adamerging"] for n, t in med.items()},
            "trainable_params": trainable}


def memory(model_name: str, name: str, k: int, batch: int) -> dict:
    """Run in a fresh process: build ``name``, free the experts, two training steps."""
    import fusion.param.coefficients  # noqa: F401  (imports before the baseline)
    import fusion.param.concrete  # noqa: F401
    import fusion.train.bilevel  # noqa: F401
    import fusion.train.module  # noqa: F401
    import fusion.train.objectives  # noqa: F401

    encoder = base_encoder(model_name)
    data = batches(encoder, k, batch)
    gc.collect()
    baseline = rss_kib("VmRSS") or 0
    tv = task_vectors(encoder, k)
    step = make_step(name, build(name, encoder, tv).train(), data)
    del tv
    resident, peak, phase = phase_peak(lambda: (step(), step()))
    return {"peak_rss_mib": peak / 1024, "baseline_mib": baseline / 1024, "resident_mib": resident / 1024,
            "train_peak_mib": phase / 1024, "train_extra_mib": (phase - baseline) / 1024}


def memory_child(model_name: str, name: str, k: int, batch: int, threads: int) -> dict:
    return run_child("concrete_memory", f"memory({model_name!r}, {name!r}, {k}, {batch})", threads)


def print_table(result: dict, methods) -> None:
    t, mems = result.get("time"), result.get("memory", {})
    print(f"\n{result['model']}, K={result['k']}, batch {result['batch_per_task']}/task, {result['threads']} "
          f"thread(s), median of {result['repeats']}")
    print(f"{'method':<28} {'step s':>7} {'× time':>7} {'train-peak MiB':>15} {'× train-peak':>13} "
          f"{'extra MiB':>10} {'× extra':>8}")
    for name in methods:
        line = f"{name:<28} "
        line += f"{t['step_s'][name]:>7.2f} {t['ratio_to_adamerging'][name]:>7.2f} " if t and name in t["step_s"] \
            else " " * 16
        mem = mems.get(name)
        if mem:
            line += (f"{mem['train_peak_mib']:>15.0f} {mem['ratio_to_adamerging']['train_peak_mib']:>13.2f} "
                     f"{mem['train_extra_mib']:>10.0f} {mem['ratio_to_adamerging']['train_extra_mib']:>8.2f}")
        print(line)
    if mems:
        print("process peaks (construction included), MiB: "
              + ", ".join(f"{n} {m['peak_rss_mib']:.0f}" for n, m in mems.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fusion-mini8-vit")
    p.add_argument("--batch", type=int, default=16, help="images per task per step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (parent and children)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--parts", nargs="+", choices=("time", "memory"), default=["time", "memory"],
                   help="measure only these; the other part is kept from --out if it was written for the same "
                        "model, K and batch")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "concrete_memory.json"))
    args = p.parse_args()
    methods = ["adamerging"] + [m for m in args.methods if m != "adamerging"]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    result = {"model": args.model, "k": args.k, "batch_per_task": args.batch, "repeats": args.repeats,
              "threads": args.threads}
    if set(args.parts) != {"time", "memory"} and out.is_file():
        old = json.loads(out.read_text())
        if (old.get("model"), old.get("k"), old.get("batch_per_task")) == (args.model, args.k, args.batch):
            result = {**old, "threads": args.threads}
    if "time" in args.parts:
        result["repeats"] = args.repeats
        result["time"] = step_times(args.model, args.k, args.batch, args.repeats, methods)
    if "memory" in args.parts:
        result["memory"] = {name: memory_child(args.model, name, args.k, args.batch, args.threads)
                            for name in methods}
        ref = result["memory"]["adamerging"]
        for mem in result["memory"].values():
            mem["ratio_to_adamerging"] = {key: mem[key] / ref[key] for key in ("peak_rss_mib", "resident_mib",
                                                                              "train_peak_mib", "train_extra_mib")}
    print_table(result, methods)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
