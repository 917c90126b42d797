"""Peak memory and time of a streamed TIES merge of K HF checkpoints against loading them in memory and merging.

    python benchmarks/streamed_merge.py                     # K = 8 GPT-2-small-shaped checkpoints (124M each)
    python benchmarks/streamed_merge.py --config tiny --k 2 --out /tmp/streamed_merge.json   # a smoke test

The checkpoints (random GPT-2 weights; experts = base + 0.01·N(0, 1), seeded) are generated once with
``save_pretrained`` into ``--cache`` (≈ 0.5 GB each at full size) and reused. Each mode runs in a fresh
subprocess so that its ``ru_maxrss`` is its own:

- ``streamed``: :func:`fusion.stream.stream_merge` (TIES, k = 0.2, λ = 0.3: the exact global trim costs two
  extra reading passes), written as sharded safetensors;
- ``in_memory``: every state dict loaded (safetensors), the task vectors stacked, the same
  :func:`fusion.merge.ties.ties` called once, the merged state written with ``save_torch_state_dict``.

Reported per mode: ``time_s`` (merge + write, imports excluded), ``peak_rss_mib`` (VmHWM over the merge, reset
before it; ``process_peak_rss_mib``: ``ru_maxrss``, imports included) and ``baseline_mib`` (VmRSS after imports);
then the ratios in_memory / streamed of the peaks and of the peaks above the baseline (``merge_rss_ratio``), and
whether both outputs hold identical tensors. Written atomically to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"gpt2-small": {},
           "tiny": dict(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2),
           "medium": dict(vocab_size=8192, n_positions=256, n_embd=256, n_layer=4, n_head=4, bos_token_id=1,
                         eos_token_id=2)}  # 6M parameters
TIES = dict(k=0.2, lam=0.3)


def generate(cache: Path, config: str, k: int) -> tuple[Path, list[Path]]:
    """The base and ``k`` expert directories under ``cache`` (made once: a ``.done`` file marks each)."""
    import torch
    import transformers

    dirs = [cache / "base"] + [cache / f"expert{i}" for i in range(1, k + 1)]
    for seed, path in enumerate(dirs):
        if (path / ".done").exists():
            continue
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIGS[config]))
        if seed:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
        model.save_pretrained(path)
        (path / ".done").touch()
    return dirs[0], dirs[1:]


def in_memory_merge(base: Path, experts: list[Path], out: Path) -> None:
    """Load every checkpoint, stack the task vectors, merge once, write the merged state and the base's config."""
    from huggingface_hub import save_torch_state_dict

    from fusion.merge.task_vectors import add_delta, stack_task_vectors
    from fusion.merge.ties import ties
    from fusion.pools.hf_checkpoint import HFCheckpoint
    from fusion.report.sharded_safetensors import copy_side_files

    def state(path: Path) -> dict:
        ckpt = HFCheckpoint(path)
        return {n: ckpt.tensor(n).clone() for n in ckpt.names()}

    theta0 = state(base)
    tv = stack_task_vectors({n: t.float() for n, t in theta0.items()}, [state(e) for e in experts])
    out.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(add_delta(theta0, ties(tv, **TIES)), str(out))
    copy_side_files(base, out)


def child(mode: str, base: Path, experts: list[Path], out: Path, threads: int) -> dict:
    """One mode's time and memory, measured in this (fresh) process."""
    import torch

    from fusion.merge.ties import ties
    from fusion.stream import stream_merge

    from benchmarks.routed_throughput import phase_peak

    torch.set_num_threads(threads)
    start = time.perf_counter()
    run = partial(stream_merge, partial(ties, **TIES), base, experts, out, method="ties") if mode == "streamed" \
        else partial(in_memory_merge, base, experts, out)
    resident, process_peak, merge_peak = phase_peak(run)
    return {"time_s": time.perf_counter() - start, "peak_rss_mib": merge_peak / 1024, "baseline_mib": resident / 1024,
            "process_peak_rss_mib": process_peak / 1024}


def run_child(mode: str, base: Path, experts: list[Path], out: Path, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--base", str(base), "--experts", *map(str, experts),
           "--merged", str(out), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode < 0:  # killed by a signal: the in-memory merge of large K runs out of memory (SIGKILL)
        return {"failed": f"killed by signal {-done.returncode}" + (" (out of memory)" if done.returncode == -9 else ""),
                "memory_mib": machine_memory_mib()}
    if done.returncode:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine_memory_mib() -> float:
    """The machine's memory (MiB), from /proc/meminfo."""
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 1024


def ratio_above_baseline(modes: dict) -> float:
    """In-memory over streamed peak RSS above the post-import baseline (the merge's own memory)."""
    extra = {m: r["peak_rss_mib"] - r["baseline_mib"] for m, r in modes.items()}
    return extra["in_memory"] / max(extra["streamed"], 1e-9)


def comparison(modes: dict, work: Path) -> dict:
    """Identical outputs and the in-memory / streamed RSS ratios, when both modes finished."""
    if any("failed" in r for r in modes.values()):
        return {}
    return {"identical_outputs": identical(work / "streamed", work / "in_memory"),
            "peak_rss_ratio": modes["in_memory"]["peak_rss_mib"] / modes["streamed"]["peak_rss_mib"],
            "merge_rss_ratio": ratio_above_baseline(modes)}


def identical(a: Path, b: Path) -> bool:
    """Whether two checkpoint directories hold the same tensors (read one at a time)."""
    import torch

    from fusion.pools.hf_checkpoint import HFCheckpoint

    x, y = HFCheckpoint(a), HFCheckpoint(b)
    return x.names() == y.names() and all(torch.equal(x.tensor(n), y.tensor(n)) for n in x.names())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="gpt2-small")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fusion" / "streamed_merge")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "streamed_merge.json")
    parser.add_argument("--child", choices=["streamed", "in_memory"])
    parser.add_argument("--base", type=Path)
    parser.add_argument("--experts", type=Path, nargs="*")
    parser.add_argument("--merged", type=Path)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.base, args.experts, args.merged, args.threads)))
        return {}
    import shutil

    from fusion.utils import atomic_write_json

    base, experts = generate(args.cache / f"{args.config}-k{args.k}", args.config, args.k)
    work = args.cache / "outputs"
    shutil.rmtree(work, ignore_errors=True)
    modes = {m: run_child(m, base, experts, work / m, args.threads) for m in ("streamed", "in_memory")}
    result = {
        "command": "python benchmarks/streamed_merge.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": args.config, "k": args.k, "method": {"ties": TIES}, "threads": args.threads,
        "checkpoint_mib": sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2 ** 20,
        "modes": modes, **comparison(modes, work),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    shutil.rmtree(work, ignore_errors=True)
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
