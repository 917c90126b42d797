"""The shipped mini8 CLIP (fusion/assets/mini8_clip) is what its model card says it is."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusion.pools.mini8_base import CARD, CARD_MD, RELEASE_DIR, RELEASE_NAME, read_card, render_card, verify_release
from fusion.pools.openclip import CONFIG_NAME, WEIGHTS_NAME
from fusion.utils import read_safetensors, sha256_file

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_weights_hash_to_the_card_and_fit_the_size_limit():
    card = verify_release()
    weights = RELEASE_DIR / WEIGHTS_NAME
    assert card["name"] == RELEASE_NAME
    assert sha256_file(weights) == card["sha256"] and weights.stat().st_size == card["bytes"]
    assert card["bytes"] <= 40 * 2**20  # the limit for a file in the repository
    state = read_safetensors(weights)
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.bfloat16}
    assert (RELEASE_DIR / CARD_MD).read_text() == render_card(card)  # the markdown card is rendered from card.json


def test_shipped_config_is_the_registered_architecture_of_the_recipe():
    card = read_card()
    shipped = json.loads((RELEASE_DIR / CONFIG_NAME).read_text())["model_cfg"]
    registered = json.loads((ROOT / "fusion" / "pools" / "configs" / f"{card['recipe']['model']}.json").read_text())
    assert shipped == registered
    assert shipped["vision_cfg"]["layers"] == 8 and shipped["vision_cfg"]["width"] == 192


def test_shipped_release_loads_through_open_clip_and_reproduces_its_zero_shot_table():
    """The card's zero-shot accuracies, measured again here on the val split from the file as open_clip loads it."""
    import open_clip

    from fusion.data.mini8 import default_root, read_manifest
    from fusion.data.taskpool import mini8_taskpool
    from fusion.evaluate import evaluate, summarize
    from fusion.pools.mini8_build import zero_shot_heads

    card = read_card()
    if read_manifest(default_root()) is None:
        pytest.fail("the mini8 data is not built: `make test` builds it (fusion-build-mini8 --fetch)")
    clip = open_clip.create_model(f"local-dir:{RELEASE_DIR}").float().eval()
    taskpool = mini8_taskpool()
    heads = zero_shot_heads(clip, taskpool, open_clip.get_tokenizer(f"local-dir:{RELEASE_DIR}"))
    measured = summarize(evaluate(clip.visual, heads, taskpool, split="val"))
    assert measured["per_task"] == pytest.approx(card["zero_shot"]["val"]["per_task"], abs=1e-9)
    assert 0.2 < measured["mean_accuracy"] < 0.9  # trained, and not trivially separable

