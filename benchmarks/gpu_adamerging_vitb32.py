"""Time one layer-wise AdaMerging step on an open_clip ViT-B/32 (random weights, K random experts).

A step (Yang et al., ICLR 2024, Eq. 6; METHODS.md §1): θ^l = θ0^l + Σ_k λ_k^l τ_k^l is built once with
``fusion.merge.combine.combine``; then for each of the K tasks a batch of 16 images goes through
``torch.func.functional_call(model.visual, θ)``, its prediction entropy is back-propagated into θ (one backward
per task, as FusionBench does), and one backward through the merge turns ∂L/∂θ into ∂L/∂λ
(= ⟨∂L/∂θ^l, τ_k^l⟩); Adam then updates λ. The floor is K plain forward+backward passes of one model.

    python benchmarks/gpu_adamerging_vitb32.py --out results.json            # CUDA; exits 0 with a note without it
    python benchmarks/gpu_adamerging_vitb32.py --device cpu --image-size 64 --steps 2 --out smoke.json

Reports the median step time, its ratio to the floor, and ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fusion.merge.combine import combine  # noqa: E402


def build_visual(model: str, image_size: int, device: torch.device) -> nn.Module:
    """A random-init open_clip image tower; ``model`` is a registered name or a path to a JSON model config."""
    import open_clip

    if model.endswith(".json"):
        open_clip.add_model_config(model)
        model = Path(model).stem
    clip = open_clip.create_model(model, pretrained=None, force_image_size=image_size)
    return clip.visual.to(device).eval()


def random_task_vectors(visual: nn.Module, k: int, sigma: float, seed: int) -> dict[str, Tensor]:
    """``{name: Tensor[K, *shape]}``: K small Gaussian perturbations, one per floating parameter."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return {n: (sigma * torch.randn((k, *p.shape), generator=gen)).to(p.device)
            for n, p in visual.named_parameters()}


def entropy(logits: Tensor) -> Tensor:
    """Mean prediction entropy ``-Σ_c p_c log p_c`` (ε = 1e-8 inside the log, as FusionBench)."""
    p = logits.float().softmax(-1)
    return -(p * (p + 1e-8).log()).sum(-1).mean()


class Bench:
    def __init__(self, args: argparse.Namespace, device: torch.device):
        torch.manual_seed(args.seed)
        self.device, self.k, self.amp = device, args.num_tasks, args.autocast == "bf16"
        self.visual = build_visual(args.model, args.image_size, device)
        for p in self.visual.parameters():
            p.requires_grad_(False)
        self.theta0 = {n: p.detach() for n, p in self.visual.named_parameters()}
        self.tv = random_task_vectors(self.visual, self.k, args.sigma, args.seed)
        dim = self.visual.output_dim
        self.heads = [F.normalize(torch.randn(args.num_classes, dim, device=device), dim=-1) for _ in range(self.k)]
        self.images = [torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
                       for _ in range(self.k)]
        self.lam = nn.Parameter(torch.full((self.k, len(self.tv)), 0.3, device=device))
        self.opt = torch.optim.Adam([self.lam], lr=1e-3)

    def logits(self, params: dict[str, Tensor], task: int) -> Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            feats = torch.func.functional_call(self.visual, params, (self.images[task],))
        return 100.0 * F.normalize(feats.float(), dim=-1) @ self.heads[task].T

    def adamerging_step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        delta = combine(self.tv, self.lam)
        merged = {n: self.theta0[n] + d for n, d in delta.items()}
        leaves = {n: m.detach().requires_grad_(True) for n, m in merged.items()}
        total = 0.0
        for t in range(self.k):  # one backward per task into the merged weights
            loss = entropy(self.logits(leaves, t))
            loss.backward()
            total += float(loss.detach())
        torch.autograd.backward(list(merged.values()), [leaves[n].grad for n in merged])  # ∂L/∂θ -> ∂L/∂λ
        self.opt.step()
        return total

    def plain_passes(self) -> None:
        """The floor: K forward+backward passes of one model, weights requiring grad."""
        params = {n: p.detach().requires_grad_(True) for n, p in self.theta0.items()}
        for t in range(self.k):
            entropy(self.logits(params, t)).backward()


def timed(fn, steps: int, warmup: int, device: torch.device) -> list[float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    bench = Bench(args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    lam_before = bench.lam.detach().clone()
    step_times = timed(bench.adamerging_step, args.steps, args.warmup, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    floor_times = timed(bench.plain_passes, args.steps, args.warmup, device)
    step, floor = statistics.median(step_times), statistics.median(floor_times)
    n_params = sum(p.numel() for p in bench.visual.parameters())
    return {
        "model": args.model, "device": str(device), "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "torch": torch.__version__, "image_size": args.image_size,
        "num_tasks": bench.k, "batch_size": args.batch_size, "num_tensors": len(bench.tv), "visual_params": n_params,
        "autocast": args.autocast, "steps": args.steps, "warmup": args.warmup,
        "step_seconds_median": step, "step_seconds": step_times,
        "floor_seconds_median": floor, "floor_seconds": floor_times, "ratio_to_floor": step / floor,
        "max_memory_allocated_bytes": peak, "max_memory_allocated_gib": peak / 2**30 if peak else None,
        "lambda_changed": bool((bench.lam.detach() - lam_before).abs().max() > 0),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (skipped with exit 0 when absent) or cpu")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name or a path to a model-config JSON")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16, help="images per task per step")
    p.add_argument("--num-tasks", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sigma", type=float, default=1e-3, help="scale of the random task vectors")
    p.add_argument("--autocast", choices=("none", "bf16"), default="none")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: skipping the GPU AdaMerging benchmark (use --device cpu for a smoke run)")
        if args.out:
            args.out.write_text(json.dumps({"skipped": "CUDA is not available"}, indent=2) + "\n")
        return 0
    results = run(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
