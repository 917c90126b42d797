"""Real CLIP model pools: a pretrained open_clip model (θ0), fine-tuned image encoders (θ_k) and cached heads.

Checkpoint families (METHODS.md §0; never mix them in one table):

* **(A) open_clip** experts, e.g. the task-vectors paper's: safetensors (or ``.pt`` plain state dicts, read
  with ``torch.load(weights_only=True)`` only) holding either the whole CLIP (``visual.*`` keys) or the image
  tower alone. The paper's released files are *pickled modules*: convert each once with
  ``python -m fusion.pools.convert_task_vectors_ckpt IN.pt OUT.safetensors --trust``; nothing here unpickles.
* **(B) HuggingFace** ``CLIPVisionModel`` experts (FusionBench's ``tanganke/clip-vit-base-patch32_<task>``),
  converted to open_clip's keys by :mod:`fusion.pools.hf_convert` (needs ``fusion[transformers]``).

Memory: the pool keeps θ0 and the K experts; stacked task vectors add K·P floats. In fp32 that is about
2.8 GB for ViT-B/32 (P ≈ 88M, K = 8) and 9.7 GB for ViT-L/14 (P ≈ 304M); ``tv_dtype: bfloat16`` halves the
task vectors (1.4 / 4.9 GB) at bf16's ~3 significant digits, far below the size of a fine-tuning update.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusion.errors import CorruptFileError, MissingFileError
from fusion.merge.task_vectors import PoolMismatchError, StateDict, TaskVectors, floating_dtype
from fusion.pools.heads import ZeroShotHeads, class_embeddings
from fusion.pools.pool import ModelPool
from fusion.utils import atomic_save_safetensors, read_safetensors, sha256_json

log = logging.getLogger(__name__)

EXPERT_FORMATS = ("auto", "open_clip", "hf")
HEADS_VERSION = "clip-heads-v1"
CONVERT_HINT = ("it looks like a pickled module (e.g. the task-vectors paper's ImageEncoder); convert it once "
                "with `python -m fusion.pools.convert_task_vectors_ckpt {src} OUT.safetensors --trust` and "
                "point the config at OUT.safetensors")


@dataclasses.dataclass
class CLIPModelPool(ModelPool):
    """A :class:`ModelPool` whose :meth:`task_vectors` default to ``tv_dtype`` (e.g. ``torch.bfloat16``)."""

    tv_dtype: torch.dtype | None = None

    def task_vectors(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> TaskVectors:
        return super().task_vectors(dtype=dtype or self.tv_dtype, device=device)

    def select(self, tasks: Sequence[str] | None) -> "CLIPModelPool":
        base = super().select(tasks)
        return self if base is self else dataclasses.replace(self, experts=base.experts, sources=base.sources)


# --------------------------------------------------------------------------------------------- key layouts
def is_hf_layout(state: Mapping[str, Tensor]) -> bool:
    """Whether ``state`` uses transformers' CLIP vision keys (``embeddings.patch_embedding``, ``encoder.layers``)."""
    return any("embeddings.patch_embedding" in k for k in state)


def visual_state_dict(state: Mapping[str, Any], source: str = "<memory>") -> StateDict:
    """The open_clip image-tower tensors of ``state``, with their prefix stripped.

    Accepts visual-only keys, whole-CLIP keys (``visual.*``), the task-vectors ``ImageEncoder`` layout
    (``model.visual.*``), any deeper nesting, and HF ``CLIPVisionModel`` keys (converted).
    """
    if is_hf_layout(state):
        from fusion.pools.hf_convert import hf_clip_vision_to_open_clip

        return hf_clip_vision_to_open_clip(state, visual_projection=state.get("visual_projection.weight"))
    prefixes = sorted({k[: -len("class_embedding")] for k in state if k.endswith("class_embedding")}, key=len)
    if not prefixes or (prefixes[0] and not prefixes[0].endswith(".")):
        sample = list(state)[:5]
        raise PoolMismatchError(f"{source}: no open_clip ViT image tower found (no '<prefix>class_embedding' key); "
                                f"first keys: {sample}. Is it an open_clip / HF CLIP vision checkpoint?")
    prefix = prefixes[0]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and isinstance(v, Tensor)}


def _unwrap(obj: Any, source: str) -> Mapping[str, Tensor]:
    """The state dict inside a loaded ``.pt`` object (``{'state_dict': ...}`` wrappers included)."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise PoolMismatchError(f"{source}: expected a state dict, got {type(obj).__name__}")
    return obj


# ------------------------------------------------------------------------------------------------ sources
def resolve_path(source: str, cache_dir: Path, download: bool) -> Path:
    """A local path for ``source``: ``~``/env expanded; ``https://`` URLs downloaded into the cache if asked."""
    if source.startswith(("https://", "http://")):
        target = cache_dir / "checkpoints" / Path(source.split("?")[0]).name
        if not target.is_file():
            if not download:
                raise MissingFileError(f"expert URL {source} is not in the cache ({target}); set "
                                       "modelpool.download=true to fetch it, or download it there yourself")
            log.info("downloading %s -> %s", source, target)
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(source, str(target), progress=False)
        return target
    return Path(os.path.expandvars(os.path.expanduser(source)))


def detect_format(source: str, path: Path) -> str:
    """``'hf'`` for ``hf:<id>``, a transformers directory or an ``org/name`` hub id; else ``'open_clip'``."""
    if source.startswith("hf:") or (path.is_dir() and (path / "config.json").is_file()):
        return "hf"
    if path.suffix in (".safetensors", ".pt", ".pth", ".bin") or path.exists():
        return "open_clip"
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return "hf"
    raise MissingFileError(f"expert checkpoint {source} not found (looked at {path}); give a .safetensors/.pt "
                           "path, an https:// URL or an HF model id (hf:org/name)")


def load_state_file(path: Path) -> Mapping[str, Tensor]:
    """Read a ``.safetensors`` file, or a ``.pt/.pth/.bin`` state dict with ``torch.load(weights_only=True)``."""
    import pickle

    if not path.is_file():
        raise MissingFileError(f"expert checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        return _unwrap(torch.load(path, map_location="cpu", weights_only=True), str(path))
    except (RuntimeError, EOFError) as e:  # a truncated or non-torch file
        raise CorruptFileError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    except pickle.UnpicklingError as e:
        raise PoolMismatchError(f"{path}: torch.load(weights_only=True) refused it: "
                                + CONVERT_HINT.format(src=path)) from e


def load_expert(source: str, *, expert_format: str = "auto", cache_dir: Path, download: bool = False,
                hf_cache_dir: str | None = None) -> StateDict:
    """Open_clip ``model.visual`` weights from a file, URL or HF checkpoint (``proj`` may be absent for HF)."""
    if expert_format not in EXPERT_FORMATS:
        raise ValueError(f"expert_format must be one of {EXPERT_FORMATS}, got '{expert_format}'")
    path = resolve_path(source, cache_dir, download) if not source.startswith("hf:") else Path(source)
    fmt = detect_format(source, path) if expert_format == "auto" else expert_format
    if fmt == "hf":
        from fusion.pools.hf_convert import hf_clip_vision_to_open_clip, load_hf_clip_vision

        hf_id = source[3:] if source.startswith("hf:") else str(path if path.exists() else source)
        state, projection = load_hf_clip_vision(hf_id, cache_dir=hf_cache_dir)
        return hf_clip_vision_to_open_clip(state, visual_projection=projection)
    return visual_state_dict(load_state_file(path), source)


def conform(state: StateDict, reference: Mapping[str, Tensor], source: str) -> StateDict:
    """Fill a missing ``proj`` from θ0 (HF vision-only experts share the pretrained projection) and cast
    floating tensors to the encoder's dtype (fp16 checkpoints); key/shape errors are left to the pool."""
    state = dict(state)
    if "proj" in reference and "proj" not in state:
        log.info("%s has no visual projection: using the pretrained model's", source)
        state["proj"] = reference["proj"]
    for k, v in state.items():
        ref = reference.get(k)
        if ref is not None and v.is_floating_point() and v.dtype != ref.dtype:
            state[k] = v.to(ref.dtype)
    return state


# -------------------------------------------------------------------------------------------------- heads
def zero_shot_heads(clip_model: nn.Module, tokenizer, taskpool, cache_dir: str | Path, model_key: str,
                    tasks: Sequence[str] | None = None, batch_size: int = 256) -> ZeroShotHeads:
    """CLIP zero-shot heads of ``tasks`` (default: all of ``taskpool``), cached on disk per task.

    Each head is ``<cache_dir>/heads/<task>-<key>.safetensors`` with ``key`` the sha256 of
    ``(model_key, class names, templates)``; a matching file is read instead of running the text tower.
    """
    logit_scale = min(float(clip_model.logit_scale.detach().exp()), 100.0)
    heads = {}
    for task in tasks if tasks is not None else taskpool.tasks:
        classnames, templates = list(taskpool.classnames(task)), list(taskpool.templates(task))
        key = sha256_json({"v": HEADS_VERSION, "model": model_key, "classnames": classnames,
                           "templates": templates})[:20]
        path = Path(cache_dir) / "heads" / f"{task}-{key}.safetensors"
        heads[task] = _cached_head(path, lambda: _text_head(clip_model, tokenizer, classnames, templates,
                                                            batch_size), {"task": task, "model": model_key})
    return ZeroShotHeads(heads, logit_scale)


def _cached_head(path: Path, compute, metadata: Mapping[str, str]) -> Tensor:
    if path.is_file():
        log.debug("zero-shot head from %s", path)
        return read_safetensors(path)["head"]
    head = compute()
    atomic_save_safetensors(path, {"head": head}, metadata)
    return head


@torch.no_grad()
def _text_head(clip_model: nn.Module, tokenizer, classnames: list[str], templates: list[str],
               batch_size: int) -> Tensor:
    device = next(clip_model.parameters()).device
    was_training = clip_model.training
    clip_model.eval()

    def encode(tokens: Tensor) -> Tensor:
        return torch.cat([clip_model.encode_text(t.to(device)).float().cpu() for t in tokens.split(batch_size)])

    head = class_embeddings(encode, tokenizer, classnames, templates)
    clip_model.train(was_training)
    return head


def text_tower_key(model: str, pretrained: str | None, clip_model: nn.Module) -> str:
    """What the heads depend on: ``model/tag`` for a released tag, else a hash of the non-visual weights."""
    import hashlib

    import open_clip

    if pretrained and pretrained in open_clip.list_pretrained_tags_by_model(model):
        return f"open_clip:{model}/{pretrained}"
    h = hashlib.sha256()
    for name, t in clip_model.state_dict().items():
        if not name.startswith("visual."):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    return f"open_clip:{model}/weights-{h.hexdigest()[:20]}"


# ---------------------------------------------------------------------------------------------- the pool
def _under(directory: str | None, source: str) -> str:
    """``directory/source`` for a relative file path; URLs, ``hf:`` ids and absolute paths unchanged."""
    source = str(source)
    if not directory or source.startswith(("hf:", "https://", "http://", "/", "~", "$")):
        return source
    return str(Path(os.path.expandvars(os.path.expanduser(str(directory)))) / source)


def create_open_clip(model: str, pretrained: str | None, cache_dir: str | None = None):
    """``open_clip.create_model_and_transforms(model, pretrained)`` with the tag's activation (QuickGELU for
    OpenAI weights: open_clip 3 only warns when ``ViT-B-32`` meets ``openai``). Returns ``(clip, preprocess_val)``."""
    import open_clip

    from fusion.pools.openclip import register_configs

    register_configs()
    quick_gelu = bool(pretrained and open_clip.get_pretrained_cfg(model, pretrained).get("quick_gelu", False))
    try:
        clip, _, preprocess_val = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, cache_dir=cache_dir, force_quick_gelu=quick_gelu)
    except RuntimeError as e:
        if pretrained and "download" in str(e).lower():
            from fusion.errors import DownloadUnavailableError

            raise DownloadUnavailableError(f"open_clip could not fetch the weights '{model}' / '{pretrained}' ({e}). Offline, "
                               "download them once elsewhere into the open_clip / HF cache, or set "
                               "modelpool.pretrained to a local checkpoint file") from e
        raise
    return clip, preprocess_val


def clip_pool(model: str, pretrained: str | None, experts: Mapping[str, str], taskpool, *,
              name: str | None = None, cache_dir: str | None = None, expert_format: str = "auto",
              tv_dtype: str | torch.dtype | None = None, download: bool = False, checkpoint_dir: str | None = None,
              pretrained_visual: str | None = None, device: str = "cpu") -> CLIPModelPool:
    """Build a pool from an open_clip model name + tag and one checkpoint per task.

    Args:
        model, pretrained: open_clip architecture and weights tag (``"ViT-B-32", "openai"``); ``None`` = random init.
        experts: ``{task: source}``; a source is a ``.safetensors`` / ``.pt`` path, an ``https://`` URL (fetched
            into ``<cache_dir>/checkpoints`` only with ``download=True``), or an HF model (``hf:org/name``).
        taskpool: gives ``classnames(task)`` / ``templates(task)`` for the zero-shot heads.
        cache_dir: heads and downloads (default ``$FUSION_CACHE`` or ``~/.cache/fusion``).
        checkpoint_dir: relative expert paths are taken under it (``~`` and ``$VARS`` expanded; not for ``hf``).
        expert_format: ``auto`` (by file suffix / ``hf:``), ``open_clip`` or ``hf``.
        tv_dtype: default dtype of :meth:`CLIPModelPool.task_vectors` (``bfloat16`` halves their memory).
        pretrained_visual: optional source whose image tower replaces θ0 (e.g. ``hf:openai/clip-vit-base-patch32``
            so that family-(B) task vectors are taken against the exact weights they were fine-tuned from).
    """
    import open_clip

    from fusion.data.cache import default_cache_dir

    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if expert_format != "hf":
        experts = {task: _under(checkpoint_dir, src) for task, src in experts.items()}
    clip, preprocess_val = create_open_clip(model, pretrained)
    clip = clip.to(device).eval()
    if pretrained_visual:
        base = load_expert(pretrained_visual, cache_dir=cache, download=download)
        clip.visual.load_state_dict(conform(base, clip.visual.state_dict(), pretrained_visual), strict=True)
    reference = {k: v.cpu() for k, v in clip.visual.state_dict().items()}
    loaded = {task: conform(load_expert(src, expert_format=expert_format, cache_dir=cache, download=download),
                            reference, src) for task, src in experts.items()}
    model_key = text_tower_key(model, pretrained, clip)
    heads = zero_shot_heads(clip, open_clip.get_tokenizer(model), taskpool, cache, model_key, tasks=list(experts))
    dtype = floating_dtype(tv_dtype, "modelpool.tv_dtype")
    manifest = {"name": name or f"{model}-{pretrained}", "model": model, "pretrained": pretrained,
                "pretrained_visual": pretrained_visual, "tasks": list(experts), "heads_model_key": model_key,
                "tv_dtype": str(dtype).removeprefix("torch.") if dtype else None,
                "sources": dict(experts), "preprocess": repr(preprocess_val)}
    manifest["pool_hash"] = sha256_json({k: manifest[k] for k in ("model", "pretrained", "pretrained_visual",
                                                                   "sources")})[:16]
    return CLIPModelPool(manifest["name"], clip.visual.cpu(), loaded, heads, manifest, dict(experts), tv_dtype=dtype)
