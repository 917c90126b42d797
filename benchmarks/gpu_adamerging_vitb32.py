"""Time the library's layer-wise AdaMerging loop, ``fusion.train.module.MergeTraining``, on an open_clip ViT.

Everything timed is the library's code path. The merged model comes from
``fusion.param.coefficients.coefficient_merge(layer_wise=True, init=0.3)`` (random-init tower, K random task vectors),
the heads are ``fusion.pools.heads.ZeroShotHeads`` (random), the objective is ``fusion.train.objectives.Entropy``
and the optimizer is Adam with lr 1e-3 (the defaults in conf/method/adamerging_layer_wise.yaml). A real
``pytorch_lightning.Trainer`` drives ``MergeTraining`` with ``trainer.fit``. Each step builds the merge once, runs a
forward and backward per task, does one backward through the merge into λ, then steps Adam (see
fusion/train/module.py). Batches come from the library's stream (``MultiTaskDataModule``) over random uint8 images
resident on the device, indexed and normalised there while Lightning fetches the batch (outside the timed window):
no host→device copies or decoding, as in a real run whose decoded test images sit on the GPU.

A Lightning callback times each training batch from ``on_train_batch_start`` to ``on_train_batch_end``, with
``torch.cuda.synchronize()`` on CUDA, and skips the first ``--warmup`` steps. The floor is measured in the same
process: K plain forward+backward passes of one copy of the tower, with the same batch, heads, entropy and
precision.

    python benchmarks/gpu_adamerging_vitb32.py --out r.json                       # CUDA; exits 0 with a note without it
    python benchmarks/gpu_adamerging_vitb32.py --model ViT-L-14 --precision bf16-mixed --out r.json
    python benchmarks/gpu_adamerging_vitb32.py --device cpu --image-size 64 --steps 2 --warmup 1 --out smoke.json

Reports the median step time and ``seconds_per_1000_steps`` (= median × 1000), the ratio to the floor, peak memory
(``torch.cuda.max_memory_allocated`` on CUDA, peak RSS of the process on CPU), and whether the targets
(60 s per 1000 steps, 1.1× the floor) are met.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pytorch_lightning as pl  # noqa: E402

from fusion.data.taskpool import InMemoryTaskPool, TaskInfo  # noqa: E402
from fusion.param.coefficients import coefficient_merge  # noqa: E402
from fusion.pools.heads import ZeroShotHeads  # noqa: E402
from fusion.train.datamodule import MultiTaskDataModule  # noqa: E402
from fusion.train.module import MergeTraining  # noqa: E402
from fusion.train.objectives import Entropy  # noqa: E402
from fusion.utils import atomic_write_json  # noqa: E402

TARGET_SECONDS_PER_1000_STEPS = 60.0
TARGET_RATIO = 1.1


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
            for n, p in visual.named_parameters() if p.is_floating_point()}


def random_heads(tasks: list[str], num_classes: int, dim: int, device: torch.device) -> ZeroShotHeads:
    """Random frozen zero-shot heads (CLIP's logit scale of 100)."""
    return ZeroShotHeads({t: torch.randn(num_classes, dim) for t in tasks}, logit_scale=100.0).to(device)


def device_data(tasks: list[str], batch_size: int, image_size: int, device: torch.device,
                seed: int) -> MultiTaskDataModule:
    """The library's test-time-adaptation stream over random uint8 images (4 batches per task), resident on
    ``device``: every batch is indexed and normalised there, as in a real run."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = 4 * batch_size
    data = {t: {"test": (torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=gen),
                         torch.zeros(n, dtype=torch.long))} for t in tasks}
    info = {t: TaskInfo((f"{t} class",), ("a photo of a {}.",)) for t in tasks}
    return MultiTaskDataModule(InMemoryTaskPool("bench", data, info), tasks, split="test", batch_size=batch_size,
                               seed=seed, device=device)


class Setup(NamedTuple):
    module: MergeTraining
    data: MultiTaskDataModule


def build(args: argparse.Namespace, device: torch.device) -> Setup:
    """The library's training module over a random tower, K random task vectors and random heads, plus the data."""
    torch.manual_seed(args.seed)
    visual = build_visual(args.model, args.image_size, device)
    tv = random_task_vectors(visual, args.num_tasks, args.sigma, args.seed)
    tasks = [f"task{i}" for i in range(args.num_tasks)]
    heads = random_heads(tasks, args.num_classes, visual.output_dim, device)
    model = coefficient_merge(base=visual, task_vectors=tv, init=0.3, layer_wise=True)
    objective = Entropy()  # as Hydra builds conf/method/objective/entropy.yaml
    module = MergeTraining(model, heads, objective, functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.9, 0.999)))
    return Setup(module, device_data(tasks, args.batch_size, args.image_size, device, args.seed))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(pl.Callback):
    """Wall time of each training batch after the first ``warmup`` (synchronised on CUDA)."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.seen, self.starts, self.ends = 0, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(self.device)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        if self.seen >= self.warmup:
            self.starts.append(self.start)
            self.ends.append(time.perf_counter())
        self.seen += 1

    def step_seconds(self) -> list[float]:
        return [e - s for s, e in zip(self.starts, self.ends)]

    def between_steps_seconds(self) -> list[float]:
        """Lightning's and the data stream's time between one timed batch's end and the next one's start."""
        return [s - e for e, s in zip(self.ends, self.starts[1:])]


def make_trainer(args: argparse.Namespace, device: torch.device, timer: StepTimer) -> pl.Trainer:
    devices = [device.index] if device.type == "cuda" else 1
    return pl.Trainer(max_steps=args.warmup + args.steps, accelerator=device.type, devices=devices,
                      precision=args.precision, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])


def fit(module: MergeTraining, data: MultiTaskDataModule, trainer: pl.Trainer) -> None:
    with warnings.catch_warnings():  # both intended: the stream is on the device; the frozen tower stays in eval mode
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        trainer.fit(module, datamodule=data)


def time_calls(fn, steps: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def first_batch(data: MultiTaskDataModule) -> dict[str, tuple[Tensor, None]]:
    return next(iter(data.train_dataloader()))


def floor_times(module: MergeTraining, data: MultiTaskDataModule, args: argparse.Namespace,
                device: torch.device) -> list[float]:
    """K plain forward+backward passes of one copy of the tower (weights requiring grad), same precision."""
    tower = copy.deepcopy(module.model.base).requires_grad_(True)  # keeps the modes trainer.fit ran it in (eval)
    batch, bf16 = first_batch(data), args.precision == "bf16-mixed"

    def passes() -> None:
        tower.zero_grad(set_to_none=True)
        for task, (images, labels) in batch.items():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = module.objective(module.heads(tower(images), task), labels)
            loss.backward()

    return time_calls(passes, args.steps, args.warmup, device)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def resolve(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def run(args: argparse.Namespace) -> dict:
    device = resolve(args.device)
    module, data = build(args, device)
    before = [p.detach().cpu().clone() for p in module.trainable_parameters()]
    timer = StepTimer(args.warmup, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fit(module, data, make_trainer(args, device, timer))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    rss = peak_rss_mib()
    module.to(device)  # Lightning's teardown moved it to the CPU
    after = [p.detach().cpu() for p in module.trainable_parameters()]
    floor = floor_times(module, data, args, device)
    steps, gaps = timer.step_seconds(), timer.between_steps_seconds()
    step, floor_median = statistics.median(steps), statistics.median(floor)
    per_1000, ratio = step * 1000, step / floor_median
    return {
        "loop": f"{type(module).__module__}.{type(module).__qualname__}",
        "model": args.model, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "lightning": pl.__version__, "precision": args.precision,
        "image_size": args.image_size, "num_tasks": args.num_tasks, "batch_size": args.batch_size,
        "num_classes": args.num_classes, "num_tensors": len(module.model.names),
        "visual_params": sum(p.numel() for p in module.model.base.parameters()),
        "trainable_params": sum(p.numel() for p in after),
        "warmup": args.warmup, "steps": len(steps), "step_seconds": steps,
        "timed_seconds_total": sum(steps), "step_seconds_median": step, "seconds_per_1000_steps": per_1000,
        "between_steps_seconds_median": statistics.median(gaps) if gaps else None,
        "floor_seconds": floor, "floor_seconds_median": floor_median, "ratio_to_floor": ratio,
        "max_memory_allocated_gib": peak, "peak_rss_mib": rss,
        "lambda_changed": any(not torch.equal(a, b) for a, b in zip(after, before)),
        "target_seconds_per_1000_steps": TARGET_SECONDS_PER_1000_STEPS, "target_ratio": TARGET_RATIO,
        "meets_target_seconds": per_1000 <= TARGET_SECONDS_PER_1000_STEPS, "meets_target_ratio": ratio <= TARGET_RATIO,
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
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (and floor warm-up passes)")
    p.add_argument("--sigma", type=float, default=1e-3, help="scale of the random task vectors")
    p.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true",
                   help="passed to the Lightning Trainer; the floor runs under the same precision")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: skipping the GPU AdaMerging benchmark (use --device cpu for a smoke run)")
        return 0
    torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # no "GPU available: ..." banner
    results = run(args)
    print(json.dumps(results, indent=2))
    if args.out:
        atomic_write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
