"""Out-of-core static merging of HF checkpoint directories, tensor by tensor (as mergekit does it).

For each tensor name of the base (sorted), the base tensor and each expert's task vector are read
(:mod:`fusion.pools.hf_checkpoint`, :mod:`fusion.pools.lora_adapter`), stacked ``{name: Tensor[K, *shape]}``, given
to the SAME pure merge function an in-memory merge uses (``fn`` of ``conf/method/*.yaml``) and the merged tensor
``θ0 + δ`` is appended to the output (:mod:`fusion.report.sharded_safetensors`). Peak memory ≈ a few × K × the
largest tensor (the stacked task vectors and the merge function's intermediates on them: about 5 for TIES), not K
models; checkpoint files are opened for one read at a time, so their mapped pages do not accumulate.

A merge streams exactly when each output tensor depends on that name's stacked task vectors only, or on them
and a model-wide statistic computed by an earlier streaming pass. :data:`STREAMABLE` declares, per function, which
applies:

- per tensor: task arithmetic, simple average, MagMax, TSV-M, Iso-C, Iso-CTS, WUDI, Consensus TA;
- seeded (DARE, DELLA): one ``torch.Generator`` seeded once is passed to the calls on each name in order, which
  draws the masks of one call on the whole model (names in sorted order);
- global trim (TIES, DARE+TIES): each task's k-th largest magnitude over the whole model, found exactly by a
  two-pass radix select on the float32 bits (:mod:`fusion.merge.order_statistic`, ``K × 98304`` counts), is passed
  as ``threshold``.

WUDI reads a 2-D weight's rows as output units (``[out, in]``, as ``nn.Linear`` stores it); GPT-2's ``Conv1D``
checkpoints store ``[in, out]`` (:data:`TRANSPOSED`), so those weights are transposed for the call and back, as
the in-memory text pool's ``nn.Linear`` layers see them.

Everything else is refused with one message: data-based and learned merges, and static merges whose math needs
the whole model at once (PCB's model-wide scores, CABS' block order, EMR's per-task models, LiNeS' depth scaling).
"""
from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fusion.errors import ConfigError
from fusion.merge.combine import simple_average, task_arithmetic
from fusion.merge.consensus import consensus_merge
from fusion.merge.family import dare, della
from fusion.merge.iso import iso_c, iso_cts
from fusion.merge.magmax import magmax
from fusion.merge.order_statistic import high_histogram, low_histogram, select_bucket, threshold_from_buckets
from fusion.merge.sparsify import dare_drop, keep_count
from fusion.merge.task_vectors import add_delta
from fusion.merge.ties import ties
from fusion.merge.tsv import tsv_m
from fusion.merge.wudi import wudi
from fusion.pools.hf_checkpoint import Expert, HFCheckpoint, open_expert
from fusion.report.sharded_safetensors import ShardedWriter, TensorSpec

log = logging.getLogger(__name__)
Transform = Callable[[dict[str, Tensor], torch.Generator | None], dict[str, Tensor]]


@dataclass(frozen=True)
class StreamRule:
    """How a merge function streams exactly.

    Attributes:
        seeded: takes ``generator=``; one generator seeded with the ``seed`` hyperparameter serves every name.
        trim: ``hparams -> (k, pre)`` when the merge trims each task to its top ``k`` over the whole model (takes
            ``threshold=``), ``pre`` the transform applied before the trim (DARE's drop) or ``None``; ``None``
            (the function) or a ``None`` result when there is no global trim.
        refuse: ``hparams -> message`` for settings that do not stream, or ``None``.
        rows_out: reads a 2-D weight as ``[out, in]`` (WUDI's rows are proxy inputs): weights a checkpoint stores
            transposed (:data:`TRANSPOSED`) are transposed for the call.
    """

    seeded: bool = False
    rows_out: bool = False
    trim: Callable[[dict[str, Any]], tuple[float, Transform | None] | None] | None = None
    refuse: Callable[[dict[str, Any]], str | None] = lambda hp: None


def _dare_trim(hp: dict[str, Any]) -> tuple[float, Transform] | None:
    if not hp["consensus"]:
        return None
    return hp["k"], lambda tv, g: dare_drop(tv, p=hp["p"], generator=g)


STREAMABLE: dict[Callable, StreamRule] = {
    task_arithmetic: StreamRule(), simple_average: StreamRule(), magmax: StreamRule(), tsv_m: StreamRule(),
    iso_c: StreamRule(), iso_cts: StreamRule(), wudi: StreamRule(rows_out=True),
    consensus_merge: StreamRule(refuse=lambda hp: None if hp["base"] == "ta" else
                                "consensus_merge with base='ties' trims inside the function; use base=ta"),
    ties: StreamRule(trim=lambda hp: (hp["k"], None)),
    dare: StreamRule(seeded=True, trim=_dare_trim),
    della: StreamRule(seeded=True),
}


TRANSPOSED: dict[str, tuple[str, ...]] = {  # model_type -> the 2-D weights its checkpoints store [in, out] (Conv1D)
    "gpt2": ("attn.c_attn.weight", "attn.c_proj.weight", "attn.q_attn.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
}


def stored_transposed(config: dict, name: str) -> bool:
    """Whether checkpoint tensor ``name`` of a model with ``config`` is a ``[in, out]`` Conv1D weight."""
    return name.endswith(TRANSPOSED.get(config.get("model_type"), ()))


def hyperparameters(fn: functools.partial) -> dict[str, Any]:
    """The function's defaults overridden by the partial's keywords (the config's values)."""
    params = inspect.signature(fn.func).parameters.values()
    return {**{p.name: p.default for p in params if p.default is not inspect.Parameter.empty}, **fn.keywords}


def streaming_rule(fn: functools.partial, method: str) -> StreamRule:
    """The :class:`StreamRule` of ``fn``; a function that does not stream exactly is a :class:`ConfigError`."""
    rule = STREAMABLE.get(fn.func)
    names = sorted(f.__name__ for f in STREAMABLE)
    if rule is None:
        raise ConfigError(f"method '{method}' ({fn.func.__module__}.{fn.func.__name__}) cannot be merged tensor by "
                          f"tensor with the same result as in memory; streamed merges support the functions "
                          f"{names} (conf/method: task_arithmetic, simple_average, ties, dare, della, magmax, "
                          f"tsv_m, iso_c, iso_cts, wudi, consensus)")
    reason = rule.refuse(hyperparameters(fn))
    if reason:
        raise ConfigError(f"method '{method}': {reason}")
    return rule


def stacked(base: HFCheckpoint, experts: Sequence[Expert], name: str) -> tuple[Tensor, Tensor | None]:
    """The base tensor ``θ0`` and, when it is floating, the experts' task vectors ``Tensor[K, *shape]`` (f32)."""
    theta0 = base.tensor(name)
    if not theta0.is_floating_point():
        return theta0, None
    return theta0, torch.stack([e.task_vector(name, theta0) for e in experts])


def task_vector_stream(base: HFCheckpoint, experts: Sequence[Expert], device: torch.device,
                       pre: Transform | None, seed: int) -> Iterator[Tensor]:
    """Each floating tensor's stacked task vectors on ``device`` (after ``pre``, with a generator seeded once)."""
    generator = torch.Generator().manual_seed(int(seed))
    for name in base.names():
        _, tv = stacked(base, experts, name)
        if tv is not None:
            yield tv.to(device) if pre is None else pre({name: tv.to(device)}, generator)[name]


def trim_threshold(base: HFCheckpoint, experts: Sequence[Expert], k: float, pre: Transform | None, seed: int,
                   device: torch.device) -> Tensor:
    """Each task's ``keep_count(k, P)``-th largest float32 magnitude over the model (``Tensor[K]``), exactly,
    in two streaming passes (:mod:`fusion.merge.order_statistic`)."""
    total = sum(torch.Size(base.shape(n)).numel() for n in base.names() if base.dtype_code(n).startswith(("F", "BF")))
    n = keep_count(k, total)
    high = sum(high_histogram(t) for t in task_vector_stream(base, experts, device, pre, seed))
    bucket, rank = select_bucket(high, n)
    low = sum(low_histogram(t, bucket) for t in task_vector_stream(base, experts, device, pre, seed))
    low_bucket, _ = select_bucket(low, rank)
    return threshold_from_buckets(bucket, low_bucket)


def statistics(rule: StreamRule, hp: dict[str, Any], base: HFCheckpoint, experts: Sequence[Expert],
               device: torch.device) -> dict[str, Any]:
    """The keyword arguments every per-name call gets besides the config's: ``threshold`` (from a first pass)."""
    trim = rule.trim(hp) if rule.trim else None
    if trim is None:
        return {}
    k, pre = trim
    threshold = trim_threshold(base, experts, k, pre, hp.get("seed", 0), device)
    log.info("global trim thresholds (top %s of each task over the model): %s", k, threshold.tolist())
    return {"threshold": threshold}


def stream_merge(fn: functools.partial, base: str | Path, experts: Sequence[str | Path], output: str | Path, *,
                 method: str = "merge", max_shard_size: int | str = "2GB", device: str = "cpu") -> Path:
    """Merge checkpoint directories (or LoRA adapters) tensor by tensor with ``fn`` and write ``output``.

    Args:
        fn: a pure static merge ``fn(tv, **hparams) -> δ`` as a partial (its keywords: the hyperparameters).
        base: the pretrained checkpoint directory (or Hub repo id); experts: fine-tuned directories or adapters.
        output: a new directory: sharded safetensors + the base's config, generation config and tokenizer files.
        max_shard_size: largest shard (``"2GB"``, ``"500MB"`` or bytes); device: where the merge math runs.
    Returns:
        ``output``.
    """
    rule, hp, run_on = streaming_rule(fn, method), hyperparameters(fn), torch.device(device)
    base_ckpt = HFCheckpoint(base)
    pool = [open_expert(e) for e in experts]
    if not pool:
        raise ConfigError("experts is empty; pass at least one expert directory: experts=[DIR,...]")
    for expert in pool:
        expert.check_against(base_ckpt)
    extra = statistics(rule, hp, base_ckpt, pool, run_on)
    generator = torch.Generator().manual_seed(int(hp["seed"])) if rule.seeded else None
    specs = [TensorSpec(n, base_ckpt.shape(n), base_ckpt.dtype_code(n)) for n in base_ckpt.names()]
    with ShardedWriter(output, specs, max_shard_size) as writer:
        for name in base_ckpt.names():
            theta0, tv = stacked(base_ckpt, pool, name)
            if tv is not None:
                seeded = {"generator": generator} if rule.seeded else {}
                flip = rule.rows_out and stored_transposed(base_ckpt.config, name)
                tv = tv.transpose(1, 2) if flip else tv
                delta = fn({name: tv.to(run_on)}, **extra, **seeded)[name].cpu()
                delta = delta.T if flip else delta
                theta0 = add_delta({name: theta0}, {name: delta})[name]
            writer.write(name, theta0)
        return writer.finish(base_ckpt.directory)
