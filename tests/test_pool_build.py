"""The mini8 pool builder: its losses against explicit loops, the pretraining corpus, resumable pretraining, the
release format and the pool diagnostics."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fusion.pools.mini8_build import concept_contrastive_loss


def _reference(logits: torch.Tensor, concept: torch.Tensor) -> tuple[float, float]:
    """(image→caption, caption→image) losses with Python loops over images and concepts."""
    b = logits.shape[0]
    i2t = sum(-math.log(math.exp(logits[i, concept[i]]) / sum(math.exp(v) for v in logits[i].tolist()))
              for i in range(b)) / b
    present = sorted(set(concept.tolist()))
    t2i = 0.0
    for c in present:
        col = logits[:, c].tolist()
        denom = sum(math.exp(v) for v in col)
        t2i += -math.log(sum(math.exp(col[i]) for i in range(b) if concept[i] == c) / denom)
    return i2t, t2i / len(present)


def test_concept_contrastive_loss_matches_loops() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 7, generator=gen, dtype=torch.float64) * 3
    concept = torch.tensor([0, 3, 3, 1, 0, 6, 3, 1, 1, 0, 6, 2])
    i2t, t2i = _reference(logits, concept)
    assert math.isclose(float(concept_contrastive_loss(logits, concept)), i2t, rel_tol=1e-12)
    sym = float(concept_contrastive_loss(logits, concept, symmetric=True))
    assert math.isclose(sym, 0.5 * (i2t + t2i), rel_tol=1e-12)
    assert abs(sym - i2t) > 1e-3  # the caption->image term changes the loss


def test_symmetric_loss_gradient_pulls_positives_together() -> None:
    logits = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    concept = torch.tensor([0, 0, 1, 2])
    concept_contrastive_loss(logits, concept, symmetric=True).backward()
    pos = logits.grad[torch.arange(4), concept]
    assert (pos < 0).all()  # descending the loss raises every image's score for its own concept
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~F.one_hot(concept, 3).bool()] > 0).all()  # and lowers every negative


def test_simclr_loss_matches_loops() -> None:
    from fusion.pools.mini8_pretrain import simclr_loss

    gen = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(5, 4, generator=gen, dtype=torch.float64)
    t = 0.3
    z = F.normalize(torch.cat([z1, z2]), dim=-1).tolist()
    n, total = len(z), 0.0
    for i in range(n):
        sims = [sum(a * b for a, b in zip(z[i], z[j])) / t for j in range(n)]
        pos = (i + n // 2) % n
        total += -sims[pos] + math.log(sum(math.exp(sims[j]) for j in range(n) if j != i))
    assert math.isclose(float(simclr_loss(z1, z2, t)), total / n, rel_tol=1e-12)
    assert float(simclr_loss(z1, z1 * 2, t)) < float(simclr_loss(z1, z2, t))  # aligned views cost less


def test_pretrain_corpus_captions_the_asked_share_of_each_task(tiny_taskpool) -> None:
    from fusion.pools.mini8_build import ConceptCaptions
    from fusion.pools.mini8_pretrain import pretrain_corpus

    captions = ConceptCaptions(tiny_taskpool, lambda texts: torch.zeros(len(texts), 3, dtype=torch.long),
                               coarse={"beta": ["a beta thing."], "gamma": ["a gamma thing.", "gamma."]})
    fractions, coarse = {"alpha": 0.25, "beta": 0.0, "gamma": 0.5}, {"beta": 0.75, "gamma": 0.5}
    corpus = pretrain_corpus(tiny_taskpool, fractions, captions, seed=0, coarse_fractions=coarse)
    assert len(corpus) == sum(len(tiny_taskpool.dataset(t, "train")) for t in tiny_taskpool.tasks)
    assert len(set(captions.coarse_of.values()) | {int(c) for v in captions.concept_of.values() for c in v}) == \
        captions.tokens.shape[0]  # one caption row per fine and coarse concept, no two the same id
    for i, task in enumerate(tiny_taskpool.tasks):
        ds = tiny_taskpool.dataset(task, "train")
        rows = corpus.task == i
        assert torch.equal(corpus.images[rows], ds.images)
        concept = corpus.concept[rows]
        fine = (concept >= 0) & (concept != captions.coarse_of.get(task, -2))
        assert int(fine.sum()) == round(fractions[task] * len(ds))
        assert torch.equal(concept[fine], captions.concept_of[task][ds.labels[fine]])  # the caption names the class
        assert int((concept == captions.coarse_of.get(task, -2)).sum()) == round(coarse.get(task, 0) * len(ds))
    with pytest.raises(ValueError, match="gamma"):
        pretrain_corpus(tiny_taskpool, {**fractions, "gamma": 0.6}, captions, seed=0, coarse_fractions=coarse)
    with pytest.raises(KeyError, match="alpha"):
        pretrain_corpus(tiny_taskpool, fractions, captions, seed=0, coarse_fractions={"alpha": 0.1})


def _loop(clip, taskpool, checkpoint, stop_at=None):
    import open_clip

    from fusion.pools.mini8_build import ConceptCaptions
    from fusion.pools.mini8_pretrain import SlipPretraining, pretrain_corpus

    captions = ConceptCaptions(taskpool, open_clip.get_tokenizer("fusion-tiny-vit"))
    corpus = pretrain_corpus(taskpool, {t: 0.5 for t in taskpool.tasks}, captions, seed=0)
    return SlipPretraining(clip, captions, corpus, steps=4, batch_size=8, lr=1e-3, weight_decay=0.1, warmup=0.25,
                           ssl_weight=1.0, ssl_temperature=0.2, seed=0, amp=False, checkpoint=checkpoint,
                           checkpoint_every=2, log_every=1, stop_at=stop_at)


def test_pretraining_resumed_from_its_checkpoint_equals_one_uninterrupted_run(tiny_taskpool, tmp_path) -> None:
    from fusion.pools.openclip import create_clip

    torch.manual_seed(0)
    init = create_clip("fusion-tiny-vit").state_dict()

    def fresh():
        clip = create_clip("fusion-tiny-vit")
        clip.load_state_dict(init)
        return clip

    whole = _loop(fresh(), tiny_taskpool, None)
    whole.run()
    first = _loop(fresh(), tiny_taskpool, tmp_path / "ckpt.pt", stop_at=2)  # stops where a killed run would
    first.run()
    assert first.step == 2 and first.sched.last_epoch == 2
    resumed = _loop(fresh(), tiny_taskpool, tmp_path / "ckpt.pt")
    assert resumed.step == 2
    resumed.run()
    a, b = whole.clip.state_dict(), resumed.clip.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], init[k]) for k in a)  # it trained
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="stop_at=5"):
        _loop(fresh(), tiny_taskpool, None, stop_at=5)


def test_release_round_trips_through_open_clip_and_detects_changed_weights(tiny_base, tmp_path) -> None:
    import shutil

    import open_clip

    from fusion.pools.mini8_base import WEIGHTS_NAME, BaseReleaseError, load_base, verify_release
    from fusion.utils import read_safetensors

    card = verify_release(tiny_base)
    stored = read_safetensors(tiny_base / WEIGHTS_NAME)
    assert all(v.dtype == torch.bfloat16 for v in stored.values() if v.is_floating_point())
    plain = open_clip.create_model(f"local-dir:{tiny_base}")  # as any released CLIP loads
    base = load_base(tiny_base)
    for name, value in base.state_dict().items():
        assert torch.equal(value, stored[name].float()), name
        assert torch.equal(plain.state_dict()[name].float(), value), name
    assert set(card["zero_shot"]) == {"val", "test"} and card["recipe"]["model"] == "fusion-tiny-vit"
    assert "| test |" in (tiny_base / "MODEL_CARD.md").read_text()
    changed = tmp_path / "changed"
    shutil.copytree(tiny_base, changed)
    weights = read_safetensors(changed / WEIGHTS_NAME)
    first = next(iter(weights))
    weights[first] = weights[first] + 1
    from safetensors.torch import save_file

    save_file(weights, str(changed / WEIGHTS_NAME))
    with pytest.raises(BaseReleaseError, match=WEIGHTS_NAME):
        load_base(changed)


def test_pool_hash_follows_the_base_weights(tiny_base, tmp_path) -> None:
    import json
    import shutil

    from fusion.pools.mini8 import pool_key

    other = tmp_path / "other"
    shutil.copytree(tiny_base, other)
    card = json.loads((other / "card.json").read_text())
    card["sha256"] = "0" * 64
    (other / "card.json").write_text(json.dumps(card))
    recipe = {"seed": 0, "finetune": {}}
    assert pool_key({**recipe, "base": str(tiny_base)}, "v") != pool_key({**recipe, "base": str(other)}, "v")
    assert pool_key({**recipe, "base": str(tiny_base)}, "v") == pool_key({**recipe, "base": str(tiny_base)}, "v")


def test_entropy_thirds_rank_by_entropy() -> None:
    from fusion.pools.diagnostics import linearity, thirds_by_entropy

    # rows 0-1 confident (entropy low), 2-3 middling, 4-5 uniform (entropy highest); labels: 0 right, 1 wrong, ...
    logits = torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [2.0, 0, 0], [0, 0, 2.0], [0, 0, 0], [0, 0, 0.1]])
    labels = torch.tensor([0, 1, 1, 2, 1, 1])
    out = thirds_by_entropy(logits, labels)
    assert out["low_entropy_accuracy"] == 1.0 and out["high_entropy_accuracy"] == 0.0
    assert math.isclose(out["accuracy"], 3 / 6)
    assert linearity({"t": {"0.5": 0.7, "1": 0.9}}, {"t": 0.5}) == {"t": (0.7 - 0.5) / (0.9 - 0.5)}


def test_alpha_curve_ends_at_the_expert_and_the_ta_grid_is_the_configs(tiny_pool, tiny_taskpool) -> None:
    from omegaconf import OmegaConf

    from fusion.evaluate import task_accuracy
    from fusion.pools.diagnostics import TA_LAMBDAS, alpha_curves
    from pathlib import Path

    curves = alpha_curves(tiny_pool, tiny_taskpool, alphas=(0.5, 1.0))
    for task in tiny_pool.tasks:
        expert = task_accuracy(tiny_pool.expert_encoder(task), tiny_pool.heads, tiny_taskpool.dataset(task, "val"), task)
        assert math.isclose(curves[task]["1"], expert, abs_tol=1e-6)
    conf = OmegaConf.load(Path(__file__).parents[1] / "conf" / "method" / "task_arithmetic.yaml")
    assert tuple(conf.tune.lam) == TA_LAMBDAS
