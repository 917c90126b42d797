"""Concrete subspace masks (METHODS.md §4): the sample, the rescaled mask, the merged-model contract, the bi-level
step, saving/loading masks, bad inputs, and end-to-end runs of Concrete TA and Concrete AdaMerging on the tiny pool."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fusion.merge.masks import apply_mask, concrete_sample, mask_task_vectors, pack_bits, unpack_bits
from fusion.merge.task_vectors import stack_task_vectors
from fusion.param.coefficients import coefficient_merge
from fusion.param.concrete import NonFiniteLogitsError, concrete_merge
from fusion.report.merge_files import read_mask, write_merge_record, write_mask
from fusion.train.bilevel import BilevelTraining, split_batch
from fusion.train.objectives import Entropy
from tests.helpers import K, TinyHeads, batches, experts_of, tiny_encoder
from tests.helpers import BilevelHarness as _BilevelHarness
from tests.helpers import Harness as _Harness
from tests.test_app import run_app

entropy = Entropy()


def build(learn_coefficients=False, **kwargs):
    base = tiny_encoder()
    tv = stack_task_vectors(base.state_dict(), experts_of(base))
    return concrete_merge(base, tv, init=0.3, learn_coefficients=learn_coefficients, **kwargs), tv


def randomize_logits_(model, scale=2.0, seed=5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for x in model.weighting.logits:
            x.copy_(scale * torch.randn(x.shape, generator=gen))


def tasks_heads():
    return TinyHeads([f"t{i}" for i in range(K)])


# ---------------------------------------------------------------- the sample and the mask (pure functions)

def test_sample_matches_sigmoid_and_torch_relaxed_bernoulli():
    x = torch.linspace(-3, 3, 7)[:, None].expand(7, 100_000)
    torch.manual_seed(0)
    m = concrete_sample(x, 0.5)
    p = torch.sigmoid(x[:, 0])
    # P(m̂ > 1/2) = σ(x) exactly at any T (MC tolerance 0.01 ≈ 6 std); the relaxed mean at T = 0.5 is pulled
    # towards 1/2 by at most 0.03 for |x| ≤ 3, and equals σ(x) as T → 0
    assert torch.allclose((m > 0.5).float().mean(1), p, atol=0.01)
    assert torch.allclose(m.mean(1), p, atol=0.04) and ((m >= 0) & (m <= 1)).all()
    hard = concrete_sample(x, 1e-4)
    assert torch.allclose(hard.mean(1), p, atol=0.01)
    assert ((hard == 0) | (hard == 1)).float().mean() > 0.99  # binary up to |L + x| < ~2e-3
    logits = torch.randn(5, 6)
    torch.manual_seed(1)
    ref = torch.distributions.RelaxedBernoulli(torch.tensor(0.5), logits=logits).rsample()
    torch.manual_seed(1)
    assert torch.allclose(concrete_sample(logits, 0.5), ref, atol=1e-6)


def test_apply_mask_rescales_by_the_mean_exactly():
    tv = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 2.0, 8.0]])
    mask = torch.tensor([1.0, 0.0, 1.0, 0.5])  # mean 0.625
    expected = torch.tensor([[1.6, 0.0, 4.8, 3.2], [-1.6, 0.0, 3.2, 6.4]])
    assert torch.allclose(apply_mask(tv, mask), expected, atol=1e-6)
    assert torch.equal(apply_mask(tv, torch.zeros(4)), torch.zeros_like(tv))  # all dropped: zero, not NaN
    masked = mask_task_vectors({"w": tv.to(torch.bfloat16)}, {"w": mask})
    assert masked["w"].dtype == torch.bfloat16


def test_pack_bits_round_trip():
    mask = (torch.randn(3, 5, 7) > 0).float()
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(105 / 8)
    assert torch.equal(unpack_bits(packed, (3, 5, 7)), mask)


# ---------------------------------------------------------------- the merged model

def test_gradients_reach_every_logit_and_training_samples_are_fresh():
    model, tv = build()
    state = model.prepare()
    entropy(model(torch.randn(8, 6), state)).backward()
    for name, x in model.weighting.named_logits().items():
        assert x.grad is not None and (x.grad != 0).float().mean() > 0.9, name
    assert model.weighting.inner.lambdas.grad is None  # Concrete TA: λ is fixed
    other = model.prepare()
    assert not torch.allclose(state["0.weight"], other["0.weight"])  # a fresh sample per call


def test_concrete_merge_equals_an_independent_computation():
    model, tv = build()
    randomize_logits_(model)
    torch.manual_seed(3)
    delta = model.weighting(model.task_vectors())
    torch.manual_seed(3)
    masks = {n: torch.distributions.RelaxedBernoulli(torch.tensor(0.5), logits=x).rsample()
             for n, x in model.weighting.named_logits().items()}
    for n, t in tv.items():
        m = masks[n] / masks[n].mean()
        assert torch.allclose(delta[n], 0.3 * (t * m).sum(0), atol=1e-5), n
    # the factorized path (mask after combining) equals masking every task vector first
    literal, _ = build()
    randomize_logits_(literal)
    literal.weighting.factorized = False
    torch.manual_seed(3)
    for n, d in literal.weighting(literal.task_vectors()).items():
        assert torch.allclose(d, delta[n], atol=1e-5)


@pytest.mark.parametrize("eval_mask", ["continuous", "expected", "hard"])
def test_merge_and_unload_equals_wrapped_model_with_eval_mask(eval_mask):
    model, tv = build(eval_mask=eval_mask)
    randomize_logits_(model)
    x = torch.randn(5, 6)
    plain = model.merge_and_unload()  # in training mode: still the eval mask
    assert model.weighting.training
    assert not any(p.requires_grad for p in plain.parameters())
    model.eval()
    assert torch.allclose(plain(x), model(x), atol=1e-6)
    assert torch.allclose(model(x), model(x))  # deterministic
    final = model.weighting.final_mask()
    logits = model.weighting.named_logits()
    for n, m in final.items():
        if eval_mask == "hard":
            assert torch.equal(m, (logits[n] > 0).float())
        elif eval_mask == "expected":
            assert torch.allclose(m, torch.sigmoid(logits[n]))
        else:
            assert ((m > 0) & (m < 1)).all()
    ta = coefficient_merge(tiny_encoder(), tv, init=0.3, layer_wise=False)
    assert not torch.allclose(plain(x), ta(x), atol=1e-3)  # the mask changed the merge
    assert model.weighting.describe()["eval_mask"] == eval_mask


def test_per_task_backward_equals_summed_loss():
    model, _ = build("layer_wise")
    heads, batch = tasks_heads(), batches()
    loop = _Harness(model, heads, entropy, torch.optim.Adam)
    torch.manual_seed(7)
    loop.task_losses(batch)
    grads = [p.grad.clone() for p in loop.trainable_parameters()]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    state = model.prepare()
    sum(entropy(heads(model(x, state), t)) for t, (x, _) in batch.items()).backward()
    for g, p in zip(grads, loop.trainable_parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_entropy_steps_lower_the_entropy_of_the_expected_mask():
    model, _ = build(eval_mask="expected")
    heads, batch = tasks_heads(), batches()
    loop = _Harness(model, heads, entropy, torch.optim.Adam)
    opt = torch.optim.Adam(loop.trainable_parameters(), lr=0.2)

    def eval_entropy():
        model.eval()
        with torch.no_grad():
            value = sum(float(entropy(heads(model(x), t))) for t, (x, _) in batch.items())
        model.train()
        return value

    before = eval_entropy()
    torch.manual_seed(0)
    for _ in range(10):
        opt.zero_grad()
        loop.task_losses(batch)
        opt.step()
    assert eval_entropy() < before - 1e-3
    assert model.stats()["mask_logit_abs_mean"] > 0.1


def test_bfloat16_logits_train():
    model, _ = build(logits_dtype="bfloat16")
    assert all(x.dtype == torch.bfloat16 for x in model.weighting.logits)
    loop = _Harness(model, tasks_heads(), entropy, torch.optim.Adam)
    opt = torch.optim.Adam(loop.trainable_parameters(), lr=1e-2)
    loop.task_losses(batches())
    opt.step()
    assert all(x.dtype == torch.bfloat16 and x.abs().sum() > 0 for x in model.weighting.logits)
    assert model.weighting.describe()["logits_dtype"] == "bfloat16"


# ---------------------------------------------------------------- the bi-level step

def test_bilevel_step_updates_lambda_inner_and_logits_outer_without_leaks():
    model, _ = build("layer_wise")
    heads = tasks_heads()
    loop = _BilevelHarness(model, heads, entropy, torch.optim.Adam, lambda p: torch.optim.Adam(p, lr=1.0))
    outer_opt = torch.optim.Adam(loop.trainable_parameters(), lr=1e-3)
    lam, logits = model.weighting.inner.lambdas, list(model.weighting.logits)
    assert loop.trainable_parameters() == logits and loop.inner_parameters() == [lam]
    inner_batch, outer_batch = split_batch(batches())

    torch.manual_seed(0)
    loop.inner_step(inner_batch)
    assert all(x.grad is None for x in logits)  # the mask was detached: nothing reaches the logits
    assert all(float(x.detach().abs().max()) == 0.0 for x in logits)
    step = lam.detach() - 0.3
    assert torch.allclose(step.abs(), torch.ones_like(step), atol=1e-3)  # one fresh Adam step at lr 1: |Δλ| = 1
    after_inner = lam.detach().clone()

    loop.outer_step(outer_batch, outer_opt)
    assert lam.grad is None and torch.equal(lam.detach(), after_inner)  # λ held fixed in the outer step
    assert all(x.grad is not None for x in logits)
    assert all(torch.allclose(x.detach().abs(), torch.full_like(x, 1e-3), atol=1e-5) for x in logits)

    with torch.no_grad():
        lam.fill_(5.0)  # λ is reset before every inner step: the garbage value is not used
    torch.manual_seed(1)
    loop.inner_step(inner_batch)
    from_garbage = lam.detach().clone()
    with torch.no_grad():
        lam.fill_(0.3)
    torch.manual_seed(1)
    loop.inner_step(inner_batch)
    assert torch.equal(from_garbage, lam.detach())
    assert torch.allclose((lam.detach() - 0.3).abs(), torch.ones_like(lam), atol=1e-3)


def test_split_batch_halves():
    batch = batches()
    inner, outer = split_batch(batch)
    for t, (x, _) in batch.items():
        assert torch.equal(torch.cat([inner[t][0], outer[t][0]]), x) and len(inner[t][0]) == len(x) // 2


# ---------------------------------------------------------------- saved masks

@pytest.mark.parametrize("eval_mask, encoding", [("hard", "packbits"), ("continuous", "float32")])
def test_saved_mask_reloads_to_the_same_merged_model(tmp_path, eval_mask, encoding):
    model, tv = build(eval_mask=eval_mask)
    randomize_logits_(model)
    info = write_merge_record(model.record(), tmp_path, [f"t{i}" for i in range(K)])
    path = tmp_path / info["file"]
    assert info["eval_mask"] == eval_mask and (tmp_path / info["plot"]).stat().st_size > 1000
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["encoding"] == encoding and json.loads(f.metadata()["eval_mask"]) == eval_mask
        if encoding == "packbits":
            assert f.get_tensor("0.weight").dtype == torch.uint8
            assert f.get_tensor("0.weight").numel() == math.ceil(tv["0.weight"][0].numel() / 8)
    mask = read_mask(path, tv)
    reloaded = coefficient_merge(tiny_encoder(), mask_task_vectors(tv, mask), init=0.3, layer_wise=False)
    x = torch.randn(5, 6)
    assert torch.allclose(reloaded.merge_and_unload()(x), model.merge_and_unload()(x), atol=1e-6)


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs(tmp_path):
    for t in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            concrete_sample(torch.zeros(3), t)
        with pytest.raises(ValueError, match="temperature"):
            build(temperature=t)
    with pytest.raises(ValueError, match="eval_mask must be one of"):
        build(eval_mask="soft")
    with pytest.raises(ValueError, match="learn_coefficients must be one of"):
        build(learn_coefficients="per_element")
    with pytest.raises(ValueError, match="logits_dtype"):
        build(logits_dtype="int8")

    model, tv = build()
    with torch.no_grad():
        model.weighting.logits[3][1] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match=r"mask logits of '2.bias' contain 1 non-finite"):
        model.prepare()
    with pytest.raises(NonFiniteLogitsError, match="2.bias"):
        model.merge_and_unload()

    masks = {n: torch.ones(t.shape[1:]) for n, t in tv.items()}
    masks["3.weight"] = torch.ones(4, 8)
    write_mask(tmp_path / "bad.safetensors", masks)
    with pytest.raises(ValueError, match=r"'3.weight' has shape \(4, 8\) but the pool's parameter has shape \(5, 8\)"):
        read_mask(tmp_path / "bad.safetensors", tv)
    write_mask(tmp_path / "short.safetensors", {n: m for n, m in masks.items() if n != "0.bias"})
    with pytest.raises(ValueError, match="0.bias"):
        read_mask(tmp_path / "short.safetensors", tv)
    with pytest.raises(FileNotFoundError, match="none.safetensors"):
        read_mask(tmp_path / "none.safetensors", tv)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "bad.safetensors").read_bytes()[:40])
    with pytest.raises(OSError, match="cut.safetensors: not a readable safetensors file"):
        read_mask(tmp_path / "cut.safetensors", tv)

    with pytest.raises(ValueError, match="learnable inner variables"):
        BilevelTraining(build()[0], tasks_heads(), entropy, torch.optim.Adam, torch.optim.Adam)
    with pytest.raises(ValueError, match="inner and an outer half"):
        split_batch({"t0": (torch.randn(1, 6), None)})


# ---------------------------------------------------------------- end to end on the tiny pool

def test_concrete_task_arithmetic_end_to_end(tiny_dirs, tiny_pool, tmp_path):
    res = run_app(tiny_dirs, tmp_path, "concrete_task_arithmetic", "method.steps=3")
    assert res["method"] == "concrete_task_arithmetic" and "transductive" in res["protocol"]
    info = res["method_info"]
    num_logits = sum(p.numel() for p in tiny_pool.encoder.parameters())
    assert info["trainable_parameters"] == num_logits  # only the mask logits learn
    assert info["lambda_mean"] == pytest.approx(0.3) and 0.0 < info["mask_expected_kept"] < 1.0
    learned = load_file(tmp_path / "merge_parameters.safetensors")
    assert sum(t.numel() for t in learned.values()) == num_logits
    assert all(t.abs().max() > 0 for t in learned.values())  # the logits moved from 0
    assert info["artifacts"]["eval_mask"] == "continuous"  # results.json records the evaluation mask
    assert (tmp_path / "mask.safetensors").is_file() and (tmp_path / "mask_kept_fraction.png").is_file()


def test_concrete_adamerging_end_to_end(tiny_dirs, tiny_pool, tiny_taskpool, tmp_path):
    res = run_app(tiny_dirs, tmp_path, "concrete_adamerging_layer_wise", "method.phase1.steps=2",
                  "method.phase2.steps=2", "method.data.batch_size=4")
    assert res["method"] == "concrete_adamerging_layer_wise"
    assert res["protocol"].startswith("Concrete mask meta-learned for 2 bi-level steps, then AdaMerging over the "
                                      "masked task vectors for 2 steps; entropy minimisation on unlabeled test inputs")
    info = res["method_info"]
    assert info["mask"]["eval_mask"] == "continuous" and info["meta"]["steps"] == 2 and info["steps"] == 2
    assert info["meta"]["persistent_inner_optimizer"] is False and "mask_expected_kept" in info["meta"]
    for name in ("mask.safetensors", "mask_kept_fraction.png", "mask_logits.safetensors", "coefficients.json",
                 "merge_parameters.safetensors"):
        assert (tmp_path / name).is_file(), name
    logits = load_file(tmp_path / "mask_logits.safetensors")
    assert all(t.abs().max() > 0 for t in logits.values())
    # the saved mask and the learned λ rebuild the evaluated model
    from fusion.evaluate import evaluate
    tv = tiny_pool.task_vectors()
    lam = torch.tensor(json.loads((tmp_path / "coefficients.json").read_text())["lambdas"])
    assert lam.shape == (3, len(tv)) and not torch.allclose(lam, torch.full_like(lam, 0.3))
    rebuilt = coefficient_merge(tiny_pool.encoder, mask_task_vectors(tv, read_mask(tmp_path / "mask.safetensors", tv)),
                                init=0.3, layer_wise=True)
    with torch.no_grad():
        rebuilt.weighting.lambdas.copy_(lam)
    acc = evaluate(rebuilt.merge_and_unload(), tiny_pool.heads, tiny_taskpool, split="test")
    assert acc == pytest.approx(res["per_task"])
    # phase 2 alone from the saved mask (phase 1 skipped) learns the same λ: the same evaluated model
    again = run_app(tiny_dirs, tmp_path / "from_mask", "concrete_adamerging_layer_wise", "method.phase1.steps=0",
                    f"method.mask_checkpoint={tmp_path / 'mask.safetensors'}", "method.phase2.steps=2",
                    "method.data.batch_size=4")
    assert again["per_task"] == res["per_task"] and again["protocol"].startswith("Concrete mask loaded from")
    lam_again = json.loads((tmp_path / "from_mask" / "coefficients.json").read_text())["lambdas"]
    assert torch.equal(torch.tensor(lam_again), lam)
