"""AdaMerging step cost on CPU: time ratio to the floor, and peak memory versus K.

    python benchmarks/adamerging_step.py [--model fusion-mini8-vit] [--batch 16] [--steps 6]

*Time*: one layer-wise AdaMerging step of the shared loop (merge once, per-task forward+backward, one backward
through the merge, Adam) against the floor: K plain forward+backward passes of one model at the same batch.
*Memory*: each K runs in a fresh subprocess and reports its peak RSS; per-task backward keeps one task's
activations alive, so the growth with K is the task vectors (K·P floats), not activations.
Random weights (no pool needed). Ratios are measured in one run; absolute times vary ~3x on shared CPUs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def setup(model_name: str, k: int, image_size: int | None = None):
    from fusion.merge.task_vectors import stack_task_vectors
    from fusion.param.coefficients import coefficient_merge
    from fusion.pools.openclip import create_clip

    torch.manual_seed(0)
    encoder = create_clip(model_name).visual
    base = {n: p.detach() for n, p in encoder.state_dict().items()}
    experts = [{n: v + 0.01 * torch.randn_like(v) for n, v in base.items()} for _ in range(k)]
    model = coefficient_merge(encoder, stack_task_vectors(base, experts), init=0.3, layer_wise=True)
    return encoder, model


def step_times(model_name: str, k: int, batch: int, steps: int) -> dict:
    from fusion.train.module import MergeTraining
    from fusion.train.objectives import Entropy, entropy

    encoder, model = setup(model_name, k)
    size = encoder.image_size[0] if isinstance(encoder.image_size, tuple) else encoder.image_size
    heads = lambda f, t: f  # noqa: E731  (features as logits: the head cost is negligible)
    data = {f"t{i}": (torch.randn(batch, 3, size, size), None) for i in range(k)}

    class Loop(MergeTraining):
        def manual_backward(self, loss, *a, **kw):
            loss.backward(*a, **kw)

    loop = Loop(model, heads, Entropy(), torch.optim.Adam)
    opt = torch.optim.Adam([model.weighting.lambdas], lr=1e-3)

    def merge_step():
        opt.zero_grad()
        loop.task_losses(data)
        opt.step()

    plain = encoder  # frozen base; enable grads for a fair backward
    for p in plain.parameters():
        p.requires_grad_(True)

    def floor_step():
        for x, _ in data.values():
            entropy(plain(x)).backward()
        plain.zero_grad(set_to_none=True)

    out = {}
    for name, fn in [("floor", floor_step), ("adamerging", merge_step)] * 2:
        fn()  # warm-up
        ts = []
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
        out[name] = statistics.median(ts)
    out["ratio"] = out["adamerging"] / out["floor"]
    return out


def peak_rss_child(model_name: str, k: int, batch: int) -> float:
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import torch, resource; torch.set_num_threads(2);"
            f"from benchmarks.adamerging_step import step_times; step_times({model_name!r}, {k}, {batch}, 1);"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1]) / 1024  # MiB


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="fusion-mini8-vit")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adamerging_step.json"))
    p.add_argument("--memory-only", action="store_true", help="skip the timing (it needs a quiet machine)")
    args = p.parse_args()
    torch.set_num_threads(2)
    result = {"model": args.model, "batch_per_task": args.batch, "time": {}, "peak_rss_mib": {}}
    for k in (2, 4, 8):
        if not args.memory_only:
            result["time"][k] = step_times(args.model, k, args.batch, args.steps)
        result["peak_rss_mib"][k] = peak_rss_child(args.model, k, args.batch)
        print(k, json.dumps(result["time"].get(k)), f"peak RSS {result['peak_rss_mib'][k]:.0f} MiB", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
