"""TSV-M / TSV-C, WUDI and MagMax against hand computations and independent (numpy / loop / autograd) versions."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fusion.merge.combine import task_arithmetic
from fusion.merge.iso import iso_cts
from fusion.merge.magmax import magmax, max_magnitude
from fusion.merge.task_vectors import HyperparameterError
from fusion.merge.tsv import kept_rank, tsv_low_rank, tsv_m, tsv_merge_matrix, tsv_storage_bytes, tsv_task_delta
from fusion.merge.wudi import block_linear, wudi, wudi_adam, wudi_closed_form, wudi_loss

D = torch.float64
SHAPES = {"l0.weight": (6, 4), "l0.bias": (6,), "l1.weight": (3, 6), "ln.weight": (3,)}


def random_tv(k: int = 2, seed: int = 0, shapes: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(k, *s, generator=g, dtype=D) for n, s in (shapes or SHAPES).items()}


def np_polar(m: np.ndarray) -> np.ndarray:
    """Löwdin's symmetric orthogonalisation ``M (MᵀM)^{-1/2}`` (eigendecomposition; the reference's TSVM_2 route)."""
    ev, q = np.linalg.eigh(m.T @ m)
    return m @ (q / np.sqrt(ev)) @ q.T


def slow_tsv_m_matrix(t: torch.Tensor) -> np.ndarray:
    """TSV-M of one stacked matrix, task by task in numpy, whitening with eigh instead of an SVD polar step."""
    k, n = t.shape[0], min(t.shape[1:])
    r = n // k
    us, ss, vs = [], [], []
    for task in t.numpy():
        u, s, vh = np.linalg.svd(task, full_matrices=False)
        us.append(u[:, :r]); ss.append(s[:r]); vs.append(vh[:r].T)
    return np_polar(np.hstack(us)) @ np.diag(np.concatenate(ss)) @ np_polar(np.hstack(vs)).T


# ---------------------------------------------------------------- TSV-M

def test_tsv_m_matches_an_independent_eigh_whitening():
    tv = random_tv(k=2, seed=1)
    got = tsv_m(tv, alpha=0.7)
    for name in ("l0.weight", "l1.weight"):
        assert np.allclose(got[name].numpy(), 0.7 * slow_tsv_m_matrix(tv[name]), atol=1e-12)
    for name in ("l0.bias", "ln.weight"):  # non-matrix parameters: α·mean, as the reference
        assert torch.allclose(got[name], 0.7 * tv[name].mean(0), atol=1e-15)
    assert got["l0.weight"].dtype == D


def test_tsv_m_of_tasks_in_orthogonal_subspaces_is_their_sum():
    # τ_1 lives on e1, e2 and τ_2 on e3, e4: the concatenated U and V are already orthonormal, merged = Σ τ_k
    t = torch.zeros(2, 4, 4, dtype=D)
    t[0, 0, 0], t[0, 1, 1], t[1, 2, 2], t[1, 3, 3] = 3.0, -1.0, 2.0, 0.5
    assert torch.allclose(tsv_merge_matrix(t, 0.5), torch.diag(torch.tensor([3.0, -1.0, 2.0, 0.5], dtype=D)),
                          atol=1e-12)


def test_tsv_m_spectrum_is_the_kept_task_singular_values_and_differs_from_task_arithmetic():
    tv = random_tv(k=3, seed=2, shapes={"w": (9, 7)})
    merged = tsv_m(tv)["w"]  # r = ⌊7/3⌋ = 2 per task, 6 directions in all
    kept = torch.cat([torch.linalg.svdvals(task)[:2] for task in tv["w"]]).sort(descending=True).values
    sv = torch.linalg.svdvals(merged)
    assert torch.allclose(sv[:6], kept, atol=1e-12) and float(sv[6]) < 1e-12
    assert not torch.allclose(merged, task_arithmetic(tv, 1.0)["w"], atol=1e-3)
    assert not torch.allclose(merged, iso_cts(tv, alpha=1.0)["w"], atol=1e-3)


def test_tsv_fraction_keeps_at_least_one_direction_per_task():
    assert kept_rank(192, 1 / 8) == 24 and kept_rank(50, 1 / 5) == 10 and kept_rank(3, 1 / 8) == 1
    tv = random_tv(k=4, seed=3, shapes={"w": (3, 5)})
    assert torch.linalg.matrix_rank(tsv_m(tv)["w"]) == 3  # 4 tasks x 1 direction in a rank-3 space


# ---------------------------------------------------------------- TSV-C

def test_tsv_c_task_delta_is_the_rank_r_truncated_svd():
    tv = random_tv(k=2, seed=4)
    compressed = tsv_low_rank(tv)  # fraction 1/K = 1/2
    for k in range(2):
        delta = tsv_task_delta(compressed, k)
        for name, r in (("l0.weight", 2), ("l1.weight", 1)):
            u, s, vh = np.linalg.svd(tv[name][k].numpy(), full_matrices=False)
            assert np.allclose(delta[name].numpy(), (u[:, :r] * s[:r]) @ vh[:r], atol=1e-12)
        assert torch.equal(delta["l0.bias"], tv["l0.bias"][k]) and torch.equal(delta["ln.weight"], tv["ln.weight"][k])
    full = tsv_task_delta(tsv_low_rank(tv, fraction=1.0), 1)  # every direction kept: lossless
    assert torch.allclose(full["l0.weight"], tv["l0.weight"][1], atol=1e-12)


def test_tsv_c_storage_bytes_by_hand():
    tv = random_tv(k=2, seed=5)
    # l0.weight 6x4, r=2: U 2·6·2 + σ 2·2 + Vᵀ 2·2·4 = 44; l1.weight 3x6, r=1: 2·3 + 2 + 2·6 = 20;
    # dense l0.bias 2·6 = 12, ln.weight 2·3 = 6  ->  82 numbers
    assert tsv_storage_bytes(tsv_low_rank(tv)) == 82 * 8
    assert tsv_storage_bytes(tsv_low_rank({n: t.float() for n, t in tv.items()})) == 82 * 4


# ---------------------------------------------------------------- WUDI

def reference_loss(tau_m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The reference's loss written as it is: Σ (τ_k (τ_m − τ_k)ᵀ)² / ‖τ_k‖²_F over all entries."""
    norms = t.reshape(t.shape[0], -1).norm(dim=-1).square()
    return (torch.matmul(t, (tau_m.unsqueeze(0) - t).transpose(1, 2)).square() / norms[:, None, None]).sum()


def test_wudi_loss_matches_a_loop():
    t = random_tv(k=3, seed=6, shapes={"w": (4, 3)})["w"]
    tau_m = torch.randn(4, 3, dtype=D, generator=torch.Generator().manual_seed(7))
    slow = 0.0
    for task in t.numpy():
        diff, w = tau_m.numpy() - task, 1.0 / (task ** 2).sum()
        slow += w * sum((diff[i] @ task[j]) ** 2 for i in range(4) for j in range(4))
    assert float(wudi_loss(tau_m, t)) == pytest.approx(slow, rel=1e-12)
    assert float(reference_loss(tau_m, t)) == pytest.approx(slow, rel=1e-12)


def test_wudi_adam_follows_autograd_adam_on_the_reference_loss():
    t = random_tv(k=3, seed=8, shapes={"w": (5, 4)})["w"]
    param = torch.nn.Parameter(t.sum(0).clone())
    opt = torch.optim.Adam([param], lr=1e-2, weight_decay=0)
    for _ in range(25):
        opt.zero_grad()
        reference_loss(param, t).backward()
        opt.step()
    assert torch.allclose(wudi_adam(t, steps=25, lr=1e-2), param.detach(), atol=1e-10)


def test_wudi_closed_form_zeroes_the_gradient_and_adam_approaches_its_loss():
    t = random_tv(k=3, seed=9, shapes={"w": (4, 3)})["w"]  # A = Σ w_k τ_kᵀτ_k is 3x3, full rank
    closed = wudi_closed_form(t).requires_grad_(True)
    (grad,) = torch.autograd.grad(wudi_loss(closed, t), closed)
    loss = wudi_loss(closed.detach(), t)
    assert float(grad.norm()) < 1e-10 * float(wudi_loss(t.sum(0), t))
    adam = wudi_adam(t, steps=3000, lr=1e-2)
    start = float(wudi_loss(t.sum(0), t))
    assert float(wudi_loss(adam, t)) - float(loss) < 1e-4 * (start - float(loss))
    assert not torch.allclose(adam, t.sum(0), atol=1e-3)  # it moved away from task arithmetic


def test_wudi_tasks_on_disjoint_inputs_keep_the_task_arithmetic_sum():
    # τ_1's rows lie along e1, τ_2's along e2: no interference, the sum is the exact minimiser (zero gradient)
    t = torch.zeros(2, 3, 2, dtype=D)
    t[0, :, 0] = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    t[1, :, 1] = torch.tensor([0.3, 0.0, 4.0], dtype=D)
    assert torch.allclose(wudi_closed_form(t), t.sum(0), atol=1e-12)
    assert torch.allclose(wudi_adam(t, steps=50, lr=1e-2), t.sum(0), atol=1e-12)
    assert float(wudi_loss(t.sum(0), t)) == pytest.approx(0.0, abs=1e-24)


def test_wudi_singular_system_gets_a_ridge_and_says_so(caplog):
    t = random_tv(k=2, seed=10, shapes={"w": (1, 5)})["w"]  # A has rank 2 in 5 input directions
    with caplog.at_level(logging.WARNING):
        closed = wudi_closed_form(t)
    assert torch.isfinite(closed).all()
    assert any("singular" in r.getMessage() and "ridge" in r.getMessage() for r in caplog.records)
    assert float(wudi_loss(closed, t)) < 1e-6 * float(wudi_loss(t.sum(0), t))


def test_wudi_solves_only_the_linear_weights_and_scales_by_lambda():
    names = {"blocks.0.attn.in_proj_weight": (6, 4), "blocks.0.mlp.c_fc.weight": (5, 4), "blocks.0.mlp.c_fc.bias": (5,),
             "positional_embedding": (3, 4), "ln_post.weight": (4,)}
    tv = random_tv(k=3, seed=11, shapes=names)
    zero = wudi(tv, solver="closed_form", lam=0.5)
    mean = wudi(tv, solver="closed_form", others="mean")
    for name in ("blocks.0.attn.in_proj_weight", "blocks.0.mlp.c_fc.weight"):
        assert block_linear(name, tv[name])
        assert torch.allclose(zero[name], 0.5 * wudi_closed_form(tv[name]), atol=1e-12)
        assert torch.allclose(mean[name], 2 * zero[name], atol=1e-12)
    for name in ("blocks.0.mlp.c_fc.bias", "positional_embedding", "ln_post.weight"):
        assert torch.equal(zero[name], torch.zeros_like(tv[name][0]))
        assert torch.allclose(mean[name], tv[name].mean(0), atol=1e-15)
    suffixes = wudi(tv, solver="closed_form", lam=0.5, linear=["mlp.c_fc.weight"])
    assert torch.equal(suffixes["blocks.0.mlp.c_fc.weight"], zero["blocks.0.mlp.c_fc.weight"])
    assert torch.equal(suffixes["blocks.0.attn.in_proj_weight"], torch.zeros(6, 4, dtype=torch.float64))
    default = wudi({n: t.float() for n, t in tv.items()}, steps=3)
    assert default["blocks.0.mlp.c_fc.weight"].dtype == torch.float32
    assert not torch.allclose(default["blocks.0.mlp.c_fc.weight"], tv["blocks.0.mlp.c_fc.weight"].sum(0).float())


# ---------------------------------------------------------------- MagMax

def test_magmax_hand_example_with_a_tie():
    t = torch.tensor([[1.0, -3.0, 2.0, 0.0], [-2.0, 3.0, 0.5, 0.0]], dtype=D)
    # |1|<|-2| -> -2; |-3| = |3| -> the later task's 3; 2 > 0.5 -> 2; all zero -> 0
    assert torch.equal(magmax({"w": t}, lam=0.5)["w"], torch.tensor([-1.0, 1.5, 1.0, 0.0], dtype=D))


def test_magmax_matches_a_loop_and_differs_from_task_arithmetic():
    tv = random_tv(k=4, seed=12)
    tv["l0.weight"][1, 0, 0] = 10.0  # tasks 1 and 3 tie at the largest magnitude, with opposite signs
    tv["l0.weight"][3, 0, 0] = -10.0
    got = magmax(tv, lam=1.0)
    for name, t in tv.items():
        flat, slow = t.reshape(4, -1), []
        for j in range(flat.shape[1]):
            best = flat[0, j]
            for k in range(1, 4):
                if abs(flat[k, j]) >= abs(best):
                    best = flat[k, j]
            slow.append(float(best))
        assert got[name].reshape(-1).tolist() == slow
        assert torch.equal(max_magnitude(t), got[name])
    assert float(got["l0.weight"][0, 0]) == -10.0  # the later of the tied entries (task 3, negative) wins
    assert not torch.allclose(got["l0.weight"], task_arithmetic(tv, 1.0)["l0.weight"])


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("call, words", [
    (lambda tv: tsv_m(tv, fraction=0.0), ["fraction", "(0, 1]", "0.0"]),
    (lambda tv: tsv_m(tv, fraction=1.5), ["fraction", "(0, 1]", "1.5"]),
    (lambda tv: tsv_low_rank(tv, fraction=-0.1), ["fraction", "-0.1"]),
    (lambda tv: tsv_m(tv, alpha=0.0), ["alpha", "> 0"]),
    (lambda tv: tsv_m(tv, alpha=-1.0), ["alpha", "-1.0"]),
    (lambda tv: tsv_m({n: t[:1] for n, t in tv.items()}), ["K=1", "at least 2"]),
    (lambda tv: tsv_task_delta(tsv_low_rank(tv), 2), ["task index k", "[0, 1]", "2"]),
    (lambda tv: wudi(tv, solver="sgd"), ["solver", "'adam'", "'sgd'"]),
    (lambda tv: wudi(tv, steps=0), ["steps", "≥ 1", "0"]),
    (lambda tv: wudi(tv, steps=2.5), ["steps", "integer", "2.5"]),
    (lambda tv: wudi(tv, lr=0.0), ["lr", "> 0"]),
    (lambda tv: wudi(tv, lam=-1.0), ["lam", "> 0", "-1.0"]),
    (lambda tv: wudi(tv, ridge=-1e-3), ["ridge", "≥ 0"]),
    (lambda tv: wudi(tv, others="sum"), ["others", "'zero'", "'sum'"]),
    (lambda tv: magmax(tv, lam=0.0), ["lam", "> 0", "0.0"]),
])
def test_bad_hyperparameters_raise_one_clear_message(call, words):
    with pytest.raises(HyperparameterError) as err:
        call(random_tv(k=2, seed=13))
    assert all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize("name, shape, solved", [
    ("transformer.resblocks.3.attn.in_proj_weight", (6, 4), True), ("transformer.resblocks.3.mlp.c_fc.bias", (5,), False),
    ("vision_model.encoder.layers.1.self_attn.q_proj.weight", (4, 4), True),  # HF CLIP
    ("body.h.0.attn.c_attn.weight", (12, 4), True), ("body.wte.weight", (9, 4), False),  # GPT-2
    ("model.model.layers.1.mlp.gate_proj.weight", (8, 4), True), ("model.model.embed_tokens.weight", (9, 4), False),
    ("model.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 2), False),  # T5
    ("model.decoder.block.1.layer.2.DenseReluDense.wo.weight", (4, 8), True), ("model.lm_head.weight", (9, 4), False),
])
def test_wudi_solves_the_block_linears_of_every_backbone(name, shape, solved):
    assert block_linear(name, torch.zeros(2, *shape)) is solved
