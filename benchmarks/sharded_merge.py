"""trainer=fsdp against trainer=ddp: task-vector memory per rank and step time of layer-wise AdaMerging.

    python benchmarks/sharded_merge.py [--model fusion-mini8-vit] [--tasks 8] [--world 2] [--batch 16] [--steps 6]
    python benchmarks/sharded_merge.py --device cuda --model ViT-B-32 --world 2      # one GPU per rank (nccl)

Both modes run the same loop (:meth:`fusion.train.module.MergeTraining.task_losses`, then Adam) on ``world``
processes, each with its slice of a global batch of ``--batch`` images per task; *replicated* holds every task
vector on every rank and averages the λ gradients (what the DDP wrapper does), *sharded* holds ``1/world`` of each
(:mod:`fusion.param.sharding`). Reported per rank: task-vector bytes held, median step time, and on CUDA the peak
allocated memory; and the largest λ difference between the modes after the steps (the same training). Random
weights (no pool needed). On CPU the ranks share the machine's cores (1 thread each); ratios come from one run.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusion.utils import atomic_write_json  # noqa: E402


def worker(rank: int, world: int, port: int, args: argparse.Namespace, sharded: bool, out: str) -> None:
    import torch.distributed as dist

    from benchmarks.adamerging_step import setup
    from fusion.param.sharding import average_gradients_
    from fusion.train.module import MergeTraining
    from fusion.train.objectives import Entropy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        encoder, model = setup(args.model, args.tasks)
        if sharded:
            model.shard_task_vectors()
        model.to(device)
        size = encoder.image_size[0] if isinstance(encoder.image_size, tuple) else encoder.image_size
        gen = torch.Generator().manual_seed(1)
        per_rank = args.batch // world
        images = {f"t{i}": torch.randn(args.batch, 3, size, size, generator=gen)[rank * per_rank:(rank + 1) * per_rank]
                  for i in range(args.tasks)}
        data = {t: (x.to(device), None) for t, x in images.items()}

        class Loop(MergeTraining):
            def manual_backward(self, loss, *a, **kw):
                loss.backward(*a, **kw)

        loop = Loop(model, lambda f, t: f, Entropy(), torch.optim.Adam)
        opt = torch.optim.Adam([model.weighting.lambdas], lr=1e-3)
        times = []
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.steps + 1):
            start = time.perf_counter()
            opt.zero_grad()
            loop.task_losses(data)
            if not sharded:
                average_gradients_(model.parameters())  # DDP's all-reduce of the λ gradients
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        tv_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.startswith("tv_"))
        report = {"rank": rank, "task_vector_bytes": tv_bytes, "step_s": statistics.median(times[1:]),
                  "peak_cuda_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                  "lambdas": model.weighting.lambdas.detach().cpu().tolist()}
        Path(out, f"{'sharded' if sharded else 'replicated'}_{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fusion-mini8-vit")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="global images per task per step")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sharded_merge.json"))
    args = parser.parse_args()
    if args.batch % args.world:
        parser.error(f"--batch {args.batch} must be divisible by --world {args.world}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for sharded in (False, True):
            mp.spawn(worker, args=(args.world, free_port(), args, sharded, tmp), nprocs=args.world, join=True)
        for mode in ("replicated", "sharded"):
            rows[mode] = [json.loads(Path(tmp, f"{mode}_{r}.json").read_text()) for r in range(args.world)]
    lam = {m: torch.tensor(rows[m][0]["lambdas"]) for m in rows}
    config = vars(args) | {"torch": torch.__version__}
    config["out"] = str(Path(args.out).resolve().relative_to(ROOT)) if Path(args.out).resolve().is_relative_to(ROOT) \
        else args.out
    summary = {
        "config": config,
        "modes": {m: {"task_vector_bytes_per_rank": [r["task_vector_bytes"] for r in rs],
                      "median_step_s_per_rank": [round(r["step_s"], 4) for r in rs],
                      "peak_cuda_bytes_per_rank": [r["peak_cuda_bytes"] for r in rs]} for m, rs in rows.items()},
        "memory_ratio": rows["sharded"][0]["task_vector_bytes"] / rows["replicated"][0]["task_vector_bytes"],
        "step_time_ratio": statistics.mean(r["step_s"] for r in rows["sharded"])
        / statistics.mean(r["step_s"] for r in rows["replicated"]),
        "max_lambda_difference": float((lam["sharded"] - lam["replicated"]).abs().max()),
    }
    atomic_write_json(args.out, summary)
    print(json.dumps({k: summary[k] for k in ("memory_ratio", "step_time_ratio", "max_lambda_difference")}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
