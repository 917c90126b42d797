"""open_clip glue: custom architectures as JSON configs, and models saved in open_clip's ``local-dir`` layout.

A model directory holds ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``) and
``open_clip_model.safetensors``, so ``open_clip.create_model("local-dir:<dir>")`` reloads it bit-exactly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusion.errors import MissingFileError
from fusion.utils import atomic_save_safetensors, atomic_write_json

CONFIG_DIR = Path(__file__).parent / "configs"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def register_configs(directory: Path = CONFIG_DIR) -> list[str]:
    """Register every ``*.json`` architecture under ``directory`` with open_clip; returns the model names."""
    import open_clip

    names = []
    for path in sorted(directory.glob("*.json")):
        open_clip.add_model_config(path)
        names.append(path.stem)
    return names


def model_config(name: str) -> dict[str, Any]:
    """The architecture dict of a registered open_clip model ``name``."""
    import open_clip

    register_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise KeyError(f"open_clip knows no model config '{name}'; known: {open_clip.list_models()[:10]}...; "
                       f"add a JSON under {CONFIG_DIR} or call open_clip.add_model_config(path)")
    return cfg


def create_clip(name: str, pretrained: str | None = None, **kwargs: Any) -> nn.Module:
    """``open_clip.create_model(name, pretrained)`` after registering fusion's configs."""
    import open_clip

    register_configs()
    return open_clip.create_model(name, pretrained=pretrained, **kwargs)


def save_clip_dir(model: nn.Module, directory: str | Path, model_cfg: dict[str, Any],
                  preprocess_cfg: dict[str, Any] | None = None) -> Path:
    """Save ``model`` as an open_clip ``local-dir`` model (atomic writes)."""
    directory = Path(directory)
    atomic_save_safetensors(directory / WEIGHTS_NAME, model.state_dict())
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    atomic_write_json(directory / CONFIG_NAME, cfg)
    return directory


def load_clip_dir(directory: str | Path) -> nn.Module:
    """Load a model saved by :func:`save_clip_dir` through open_clip's ``local-dir:`` schema."""
    import open_clip

    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise MissingFileError(f"{directory / name} is missing: not an open_clip local-dir model "
                                   f"(expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    return open_clip.create_model(f"local-dir:{directory}")


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with ``requires_grad=False`` everywhere."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@torch.no_grad()
def copy_with_state(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``module`` holding ``state`` (strict; a tied tensor may be given under its first name only,
    :mod:`fusion.pools.tied`)."""
    import copy

    from fusion.pools.tied import with_aliases

    clone = copy.deepcopy(module)
    clone.load_state_dict(with_aliases(clone, state), strict=True)
    return clone
