"""One layer-wise AdaMerging step on K Llama-shaped causal LMs: time against K plain forward+backward passes, memory.

    python benchmarks/llama_adamerging_step.py --size 1b --k 4 --dtype bfloat16 --device cuda   # a GPU (~40 GB)
    python benchmarks/llama_adamerging_step.py --size small --k 4                                 # 2 CPU cores

The experts are random perturbations of a random Llama (``LlamaForCausalLM`` from a config: ``1b`` is
Llama-3.2-1B's shape, 1.24 B parameters with tied embeddings; ``small`` a 4-layer, 512-wide one for CPUs). The
merged model is fusion's layer-wise coefficient merge (:func:`fusion.param.coefficients.coefficient_merge`, one λ
per task and tensor) over the whole model, task vectors and θ0 in ``--dtype``; the step is the library's loop
(:class:`fusion.train.module.MergeTraining`: merge once, each task's entropy of the next-token distributions at
every position of its prompts, forward+backward, one backward through the merge, Adam). The floor is K plain
forward+backward passes of one model (what evaluating K experts costs). Ratios are measured side by side in one run;
absolute CPU times vary 2-3x between runs.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # LlamaConfig fields
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


class NextTokenLogits(nn.Module):
    """``ids [B, T] -> next-token logits [B·T, V]`` of a causal LM (every position's distribution)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        logits = self.model(input_ids=ids, use_cache=False).logits
        return logits.reshape(-1, logits.shape[-1])


def build(size: str, k: int, dtype: torch.dtype, device: str):
    """The plain model and fusion's layer-wise merge over K random experts (task vectors of relative size 1e-3)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusion.param.coefficients import coefficient_merge

    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[size], max_position_embeddings=2048)
    with torch.device(device):
        encoder = NextTokenLogits(LlamaForCausalLM(config).to(dtype)).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    params = dict(encoder.named_parameters())  # tied embeddings appear once
    tv = {}
    for name, p in params.items():
        scale = 1e-3 * p.float().abs().mean()
        tv[name] = torch.stack([(scale * torch.randn(p.shape, device=device)).to(dtype) for _ in range(k)])
    return encoder, coefficient_merge(encoder, tv, init=0.3, layer_wise=True)


def measure(size: str, k: int, batch: int, length: int, steps: int, dtype: torch.dtype, device: str) -> dict:
    from fusion.train.module import MergeTraining
    from fusion.train.objectives import Entropy, entropy

    encoder, model = build(size, k, dtype, device)
    vocab = SIZES[size]["vocab_size"]
    data = {f"t{i}": (torch.randint(0, vocab, (batch, length), device=device), None) for i in range(k)}

    class Loop(MergeTraining):
        def manual_backward(self, loss, *a, **kw):
            loss.backward(*a, **kw)

    loop = Loop(model, lambda f, t: f, Entropy(), torch.optim.Adam)
    opt = torch.optim.Adam([model.weighting.lambdas], lr=1e-3)

    def merge_step():
        opt.zero_grad()
        loop.task_losses(data)
        opt.step()

    for p in encoder.parameters():
        p.requires_grad_(True)

    def floor_step():
        for x, _ in data.values():
            entropy(encoder(x)).backward()
        encoder.zero_grad(set_to_none=True)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    out = {}
    for name, fn in [("floor", floor_step), ("adamerging", merge_step)] * 2:
        fn()
        sync()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        out[f"{name}_s"] = statistics.median(times)
    out["ratio"] = out["adamerging_s"] / out["floor_s"]
    out["parameters"] = sum(p.numel() for p in encoder.parameters())
    if device.startswith("cuda"):
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="sequences per task")
    p.add_argument("--length", type=int, default=128, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="a JSON file for the result")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"size": args.size, "k": args.k, "batch_per_task": args.batch, "length": args.length,
              "dtype": args.dtype, "device": args.device,
              **measure(args.size, args.k, args.batch, args.length, args.steps, getattr(torch, args.dtype),
                        args.device)}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
