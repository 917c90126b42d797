"""mini8's pretrained CLIP as a released artifact: shipped in the package, loaded like any released CLIP.

The release is an open_clip ``local-dir`` model (``open_clip_config.json`` + ``open_clip_model.safetensors`` in
bfloat16) with a model card: ``card.json`` (the pretraining recipe, data version, seed, the weights' sha256, the
zero-shot table, where and how long it trained) and ``MODEL_CARD.md`` rendered from it. ``fusion-build-mini8
--pretrain`` re-creates it from the card's recipe (:func:`fusion.pools.mini8_pretrain.pretrain_base`) and reports
whether the hash matches; the pool build (:mod:`fusion.pools.mini8`) only derives heads and fine-tunes experts.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusion.pools.openclip import CONFIG_NAME, WEIGHTS_NAME, load_clip_dir
from fusion.errors import MissingFileError, UserError
from fusion.utils import atomic_save_safetensors, atomic_write_bytes, atomic_write_json, read_json, sha256_file

RELEASE_DIR = Path(__file__).resolve().parents[1] / "assets" / "mini8_clip"
CARD = "card.json"
CARD_MD = "MODEL_CARD.md"
RELEASE_NAME = "mini8-clip-v4"


class BaseReleaseError(UserError, ValueError):
    """The shipped (or given) mini8 CLIP does not match its model card."""


def read_card(directory: str | Path = RELEASE_DIR) -> dict[str, Any]:
    path = Path(directory) / CARD
    if not path.is_file():
        raise MissingFileError(f"{path} is missing: {directory} is not a mini8 CLIP release (rebuild it with "
                               "`fusion-build-mini8 --pretrain --out DIR`, or set modelpool.recipe.base=null for "
                               "the shipped one)")
    return read_json(path)


def verify_release(directory: str | Path = RELEASE_DIR) -> dict[str, Any]:
    """The card of the release at ``directory`` after checking that its weights hash to the card's sha256."""
    directory = Path(directory)
    card = read_card(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise MissingFileError(f"{weights} is missing (a git checkout without the file? `git lfs` is not used: "
                                "the file is committed as it is)")
    digest = sha256_file(weights)
    if digest != card["sha256"]:
        raise BaseReleaseError(f"{weights} has sha256 {digest[:12]}…, its card {directory / CARD} says "
                               f"{card['sha256'][:12]}…: the weights were changed without re-releasing; restore them "
                               "(git checkout) or re-release with `fusion-build-mini8 --pretrain`")
    return card


def load_base(directory: str | Path = RELEASE_DIR) -> nn.Module:
    """The released CLIP (float32, eval mode) after :func:`verify_release`."""
    verify_release(directory)
    return load_clip_dir(directory).float().eval()


def write_release(clip: nn.Module, directory: str | Path, model_cfg: Mapping[str, Any],
                  card: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``clip`` as a bfloat16 open_clip local-dir model with its card (weights first, card last, atomic)."""
    directory = Path(directory)
    state = {k: (v.detach().to(torch.bfloat16) if v.is_floating_point() else v.detach())
             for k, v in clip.state_dict().items()}
    atomic_save_safetensors(directory / WEIGHTS_NAME, state, {"format": "pt"})
    atomic_write_json(directory / CONFIG_NAME, {
        "model_cfg": dict(model_cfg),
        "preprocess_cfg": {"size": model_cfg["vision_cfg"]["image_size"], "mean": [0.5] * 3, "std": [0.5] * 3}})
    card = {**card, "sha256": sha256_file(directory / WEIGHTS_NAME),
            "bytes": (directory / WEIGHTS_NAME).stat().st_size}
    atomic_write_json(directory / CARD, card)
    atomic_write_bytes(directory / CARD_MD, render_card(card).encode())
    return card


def render_card(card: Mapping[str, Any]) -> str:
    """``MODEL_CARD.md``: what the release is, how it was trained, and its zero-shot accuracy."""
    r = card["recipe"]
    zs = card["zero_shot"]
    tasks = list(zs["test"]["per_task"])
    rows = "\n".join(f"| {split} | " + " | ".join(f"{100 * zs[split]['per_task'][t]:.1f}" for t in tasks)
                     + f" | **{100 * zs[split]['mean_accuracy']:.1f}** |" for split in ("val", "test"))
    fractions = ", ".join(f"{t} {f:g}" for t, f in r["caption_fractions"].items())
    coarse = ", ".join(f"{t} {f:g}" for t, f in (r.get("coarse_fractions") or {}).items())
    coarse = (f" A further seeded share is captioned by its coarse category only (\"a handwritten digit.\"): {coarse}."
              if coarse else "")
    stop = r.get("stop_at") or r["steps"]
    schedule = (f"{r['steps']} steps" if stop == r["steps"]
                else f"stopped at step {stop} of a {r['steps']}-step schedule")
    return f"""# mini8 CLIP ({card['name']})

A tiny open_clip CLIP pretrained for fusion's embedded benchmark mini8; the pretrained model of every mini8 pool.
It ships as released CLIPs do and loads the same way: `open_clip.create_model("local-dir:fusion/assets/mini8_clip")`.

- Architecture `{r['model']}`: {card['model_summary']}.
- Weights: `{WEIGHTS_NAME}`, bfloat16, {card['bytes'] / 2**20:.1f} MiB, sha256 `{card['sha256']}`.
- Data: every train image of mini8 (`{card['data_version']}`, {card['corpus']['images']} images); captions on a
  seeded share per task name the class ({fractions}).{coarse} {card['corpus']['captioned']} captioned images in all.
- Objective (SLIP): image–caption contrast (both directions, every caption of a concept positive) + {r['ssl_weight']:g} ×
  SimCLR NT-Xent between two augmented views of every image (temperature {r['ssl_temperature']:g}, a projection MLP
  discarded afterwards).
- Optimisation: {schedule}, batch {r['batch_size']}, AdamW lr {r['lr']:g} (weight decay {r['weight_decay']:g}
  on matrices), {r['warmup']:g} warm-up then cosine, bf16 autocast {'on' if r['amp'] else 'off'}, seed {r['seed']}.
- Trained on {card['device']} for {card['train_seconds'] / 60:.0f} min (torch {card['torch']}).
- Rebuild: `fusion-build-mini8 --pretrain --out DIR` (reports whether the new weights hash to this card's).

Zero-shot accuracy (%; heads: per class the mean of the task's normalised template embeddings):

| split | {' | '.join(tasks)} | mean |
|---|{'---|' * len(tasks)}---|
{rows}
"""
