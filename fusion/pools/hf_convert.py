"""HuggingFace ``transformers`` CLIP vision towers in open_clip's ``model.visual`` key layout.

FusionBench's re-fine-tuned experts (checkpoint family (B) of METHODS.md §0, e.g.
``tanganke/clip-vit-base-patch32_<task>``) are ``CLIPVisionModel`` checkpoints. Their weights map one to one
onto open_clip's ``VisionTransformer`` (both are the OpenAI ViT with QuickGELU), except that HF keeps the
attention's q/k/v projections apart where ``nn.MultiheadAttention`` stores them concatenated, and that HF's
``visual_projection`` (``[embed_dim, width]``, a ``Linear`` without bias) is open_clip's ``proj``
(``[width, embed_dim]``) transposed.

Only :func:`load_hf_clip_vision` needs ``transformers`` (the optional extra ``fusion[transformers]``);
the conversion itself works on plain state dicts.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

HF_PREFIXES = ("vision_model.", "model.vision_model.", "clip.vision_model.")
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_RENAMES = {  # HF suffix inside a layer -> open_clip suffix inside ``transformer.resblocks.<i>.``
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_TOP = {  # HF key (without the vision_model. prefix) -> open_clip key
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias",
}
_IGNORED = ("embeddings.position_ids",)  # a buffer older transformers versions saved; open_clip has none


class HFConversionError(KeyError):
    """An HF CLIP vision state dict has keys this converter does not know, or lacks some it needs."""


def strip_hf_prefix(hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The vision-tower keys of ``hf_state`` without their ``vision_model.`` prefix (other keys dropped)."""
    for prefix in HF_PREFIXES:
        if any(k.startswith(prefix) for k in hf_state):
            return {k[len(prefix):]: v for k, v in hf_state.items() if k.startswith(prefix)}
    return dict(hf_state)


def hf_clip_vision_to_open_clip(hf_state: Mapping[str, Tensor], *,
                                visual_projection: Tensor | None) -> dict[str, Tensor]:
    """Convert an HF ``CLIPVisionModel`` state dict to open_clip's ``model.visual`` keys.

    Args:
        hf_state: keys ``vision_model.embeddings...`` / ``vision_model.encoder.layers.<i>...`` (the prefix is
            optional; a ``visual_projection.weight`` key, as in ``CLIPModel``, is ignored here).
        visual_projection: HF's ``visual_projection.weight`` ``[embed_dim, width]``; stored transposed as
            ``proj`` ``[width, embed_dim]``. ``None`` leaves ``proj`` out (a ``CLIPVisionModel`` has none: the
            caller keeps the pretrained model's projection).
    Returns:
        ``{open_clip key: Tensor}``; ``transformer.resblocks.<i>.attn.in_proj_weight`` is ``cat([q, k, v])``.
    Raises:
        HFConversionError: naming an unknown key, or a layer missing one of q/k/v.
    """
    state = strip_hf_prefix(hf_state)
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str, str], Tensor] = {}  # (layer, q|k|v, weight|bias)
    for key, value in state.items():
        if key in _IGNORED:
            continue
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        m = _LAYER.fullmatch(key)
        if m is None:
            raise HFConversionError(f"HF CLIP vision key '{key}' has no open_clip counterpart; expected "
                                    "embeddings.*, pre_layrnorm.*, encoder.layers.<i>.*, post_layernorm.*")
        layer, rest = int(m.group(1)), m.group(2)
        attn = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if attn:
            qkv[(layer, attn.group(1), attn.group(2))] = value
            continue
        module, _, param = rest.rpartition(".")
        if module not in _RENAMES:
            raise HFConversionError(f"HF CLIP vision key '{key}': unknown layer part '{module}'")
        out[f"transformer.resblocks.{layer}.{_RENAMES[module]}.{param}"] = value
    for layer, kind in sorted({(layer, kind) for layer, _, kind in qkv}):
        parts = [qkv.get((layer, p, kind)) for p in "qkv"]
        if any(p is None for p in parts):
            raise HFConversionError(f"HF CLIP vision layer {layer}: self_attn q/k/v {kind} incomplete")
        suffix = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"transformer.resblocks.{layer}.attn.{suffix}"] = torch.cat(parts, dim=0)
    if visual_projection is not None:
        out["proj"] = visual_projection.detach().T.contiguous()
    return out


def open_clip_to_hf_clip_vision(visual: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`hf_clip_vision_to_open_clip` (the same key tables): open_clip ``model.visual`` keys to
    ``vision_model.*`` keys with q/k/v split apart, and ``proj`` to ``visual_projection.weight`` (transposed)."""
    top, renames = {v: k for k, v in _TOP.items()}, {v: k for k, v in _RENAMES.items()}
    out: dict[str, Tensor] = {}
    for key, value in visual.items():
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(\w+)", key)
        if key == "proj":
            out["visual_projection.weight"] = value.T.contiguous()
        elif key in top:
            out[f"vision_model.{top[key]}"] = value
        elif m and m.group(3) in ("in_proj_weight", "in_proj_bias"):
            kind = "weight" if m.group(3) == "in_proj_weight" else "bias"
            for name, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"vision_model.encoder.layers.{m.group(1)}.self_attn.{name}_proj.{kind}"] = chunk.contiguous()
        elif m and m.group(2) in renames:
            out[f"vision_model.encoder.layers.{m.group(1)}.{renames[m.group(2)]}.{m.group(3)}"] = value
        else:
            raise HFConversionError(f"open_clip visual key '{key}' has no HF CLIP counterpart")
    return out


def load_hf_clip_vision(name_or_path: str, *, cache_dir: str | None = None) -> tuple[dict[str, Tensor], Tensor | None]:
    """Load an HF CLIP checkpoint (hub id or local directory) as ``(vision state dict, projection or None)``.

    ``CLIPVisionModel`` checkpoints have no projection; ``CLIPModel`` / ``CLIPVisionModelWithProjection``
    ones return their ``visual_projection.weight``. Needs ``transformers`` (``pip install 'fusion[transformers]'``).
    """
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"loading the HF CLIP checkpoint '{name_or_path}' needs transformers: "
                          "pip install 'fusion[transformers]'") from e
    config = transformers.AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir)
    architecture = (getattr(config, "architectures", None) or [""])[0]
    if config.model_type == "clip" or architecture == "CLIPVisionModelWithProjection":
        cls = transformers.CLIPModel if config.model_type == "clip" else transformers.CLIPVisionModelWithProjection
        model = cls.from_pretrained(name_or_path, cache_dir=cache_dir)
        state = {f"vision_model.{k}": v for k, v in model.vision_model.state_dict().items()}
        return state, model.visual_projection.weight.detach()
    model = transformers.CLIPVisionModel.from_pretrained(name_or_path, cache_dir=cache_dir)
    return dict(model.state_dict()), None
