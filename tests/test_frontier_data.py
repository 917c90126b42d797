"""RegMean++ and MaTS (issue 20): against hand computations, torch.linalg.solve and the closed forms they extend."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from fusion.errors import ConfigError
from fusion.merge.fisher import fisher_merge_delta
from fusion.merge.mats import conjugate_gradient, mats_fisher, mats_regmean
from fusion.merge.regmean import gram_matrices, regmean, regmean_merge
from fusion.merge.regmean_plusplus import find_blocks, regmean_plusplus
from fusion.merge.task_vectors import HyperparameterError
from fusion.methods.data_merges import MaTSMerge

D = torch.float64


def spd(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    """``Tensor[batch, n, n]`` random symmetric positive definite matrices."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(batch, n, n, generator=g, dtype=D)
    return m @ m.transpose(1, 2) + 0.1 * torch.eye(n, dtype=D)


def a_norm(e: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``sqrt(eᵀ A e)`` per row: ``e: [B, n]``, ``a: [B, n, n]`` -> ``[B]``."""
    return torch.einsum("bi,bij,bj->b", e, a, e).sqrt()


# ---------------------------------------------------------------- conjugate gradient

def test_cg_one_step_by_hand():
    # A = diag(2, 1), b = [2, 1], x0 = 0: r = p = b, |r|² = 5, Ap = [4, 1], pᵀAp = 9, step 5/9 -> x = [10/9, 5/9]
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=D)
    x = conjugate_gradient(lambda v: v @ a, torch.tensor([[2.0, 1.0]], dtype=D), torch.zeros(1, 2, dtype=D), iters=1)
    assert torch.allclose(x, torch.tensor([[10 / 9, 5 / 9]], dtype=D), atol=1e-15)
    two = conjugate_gradient(lambda v: v @ a, torch.tensor([[2.0, 1.0]], dtype=D), torch.zeros(1, 2, dtype=D), iters=2)
    assert torch.allclose(two, torch.tensor([[1.0, 1.0]], dtype=D), atol=1e-12)  # n = 2 steps solve it exactly


def test_batched_cg_equals_linalg_solve_on_random_spd_systems():
    a = spd(6, seed=1, batch=3)
    g = torch.Generator().manual_seed(2)
    b, x0 = torch.randn(3, 6, generator=g, dtype=D), torch.randn(3, 6, generator=g, dtype=D)
    x = conjugate_gradient(lambda v: torch.einsum("bij,bj->bi", a, v), b, x0, iters=60, tol=0.0)
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-9)
    stopped = conjugate_gradient(lambda v: torch.einsum("bij,bj->bi", a, v), b, x0, iters=500, tol=1e-8)
    residual = (b - torch.einsum("bij,bj->bi", a, stopped)).norm(dim=1) / b.norm(dim=1)
    assert (residual <= 1e-8).all()


def test_cg_a_norm_error_decreases_monotonically_per_row():
    a = spd(8, seed=3, batch=2)
    g = torch.Generator().manual_seed(4)
    b, x0 = torch.randn(2, 8, generator=g, dtype=D), torch.zeros(2, 8, dtype=D)
    exact = torch.linalg.solve(a, b)
    errors = torch.stack([a_norm(conjugate_gradient(lambda v: torch.einsum("bij,bj->bi", a, v), b, x0, iters=i)
                                 - exact, a) for i in range(1, 9)])
    assert (errors[1:] < errors[:-1] + 1e-12).all()
    assert (errors[0] < a_norm(x0 - exact, a)).all() and (errors[-1] < 1e-8 * errors[0]).all()


@pytest.mark.parametrize("kwargs, key", [({"iters": 0}, "iters"), ({"iters": 2.5}, "iters"), ({"tol": -1.0}, "tol")])
def test_cg_rejects_bad_iterations_and_tolerance(kwargs, key):
    with pytest.raises(HyperparameterError, match=f"mats {key} .*got"):
        conjugate_gradient(lambda v: v, torch.ones(1, 2, dtype=D), torch.zeros(1, 2, dtype=D), **kwargs)


# ---------------------------------------------------------------- MaTS

def tv_and_grams(k: int = 3, seed: int = 0, rows: int = 12):
    """Stacked task vectors (a linear weight, its bias, a LayerNorm gain) and full-rank input Grams per task."""
    g = torch.Generator().manual_seed(seed)
    tv = {"fc.weight": torch.randn(k, 5, 4, generator=g, dtype=D), "fc.bias": torch.randn(k, 5, generator=g, dtype=D),
          "ln.weight": torch.randn(k, 3, generator=g, dtype=D)}
    xs = [torch.randn(rows, 4, generator=g, dtype=D) * torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=D) for _ in range(k)]
    return tv, [{"fc": x.T @ x} for x in xs]


@pytest.mark.parametrize("alpha", [1.0, 0.8])
def test_mats_regmean_converged_is_regmean_closed_form(alpha):
    tv, grams = tv_and_grams()
    got = mats_regmean(tv, grams, alpha=alpha, lam=0.3, iters=50, tol=0.0)
    closed = regmean_merge(list(tv["fc.weight"]), [g["fc"] for g in grams], alpha=alpha)
    assert torch.allclose(got["fc.weight"], closed, atol=1e-10)
    # independent: W* minimises Σ_k ‖X_k (W − W_k)ᵀ‖² (α = 1): the stacked least-squares solution
    if alpha == 1.0:
        x = torch.cat([torch.linalg.cholesky(g["fc"]).T for g in grams])  # R_kᵀR_k = G_k, so ‖R_k·‖ = ‖X_k·‖
        y = torch.cat([torch.linalg.cholesky(g["fc"]).T @ t.T for g, t in zip(grams, tv["fc.weight"])])
        assert torch.allclose(got["fc.weight"], torch.linalg.lstsq(x, y).solution.T, atol=1e-10)
    for name in ("fc.bias", "ln.weight"):  # no curvature: averaged
        assert torch.equal(got[name], tv[name].mean(0))
    assert not torch.allclose(got["fc.weight"], 0.3 * tv["fc.weight"].sum(0), atol=1e-3)  # not task arithmetic


def test_mats_few_iterations_move_from_task_arithmetic_towards_the_solution():
    tv, grams = tv_and_grams(rows=20)
    a = sum(g["fc"] for g in grams)
    exact = regmean_merge(list(tv["fc.weight"]), [g["fc"] for g in grams], alpha=1.0)
    start = 0.3 * tv["fc.weight"].sum(0)

    def error(w):  # Σ_rows A-norm² of the row errors
        return float(torch.einsum("oi,ij,oj->", w - exact, a, w - exact))

    errors = [error(mats_regmean(tv, grams, lam=0.3, iters=i, tol=0.0)["fc.weight"]) for i in range(1, 5)]
    assert error(start) > errors[0] > errors[1] > errors[2] > 1e-6 * error(start)  # strictly between TA and W*
    assert errors[3] < 1e-10 * error(start)  # in = 4 iterations solve each row's 4x4 system
    # the start matters with few iterations: lam changes the 1-step result
    one = mats_regmean(tv, grams, lam=0.3, iters=1, tol=0.0)["fc.weight"]
    assert not torch.allclose(one, mats_regmean(tv, grams, lam=0.0, iters=1, tol=0.0)["fc.weight"])


def test_mats_fisher_converged_is_fisher_merging():
    g = torch.Generator().manual_seed(5)
    tv, _ = tv_and_grams()
    theta0 = {n: torch.randn(t.shape[1:], generator=g, dtype=D) for n, t in tv.items()}
    experts = [{n: theta0[n] + tv[n][k] for n in tv} for k in range(3)]
    fishers = [{"fc.weight": torch.rand(5, 4, generator=g, dtype=D), "ln.weight": torch.rand(3, generator=g, dtype=D)}
               for _ in range(3)]
    for normalize in (True, False):
        got = mats_fisher(tv, fishers, lam=0.3, iters=100, tol=0.0, normalize=normalize)
        want = fisher_merge_delta(theta0, experts, fishers, normalize=normalize)
        for n in tv:
            assert torch.allclose(got[n], want[n], atol=1e-10), n
    few = mats_fisher(tv, fishers, lam=0.3, iters=1, tol=0.0)["fc.weight"]
    assert not torch.allclose(few, want["fc.weight"], atol=1e-4)


def test_mats_singular_curvature_is_regularised_with_a_warning(caplog):
    tv, _ = tv_and_grams(k=2)
    x = torch.ones(3, 4, dtype=D)  # every input along one direction: Σ G has rank 1
    grams = [{"fc": x.T @ x}, {"fc": 2 * x.T @ x}]
    with caplog.at_level(logging.WARNING, logger="fusion.merge.regmean"):
        got = mats_regmean(tv, grams, iters=200, tol=0.0)
    assert "singular" in caplog.text and "ridge" in caplog.text
    assert torch.isfinite(got["fc.weight"]).all()
    assert torch.allclose(got["fc.weight"], regmean_merge(list(tv["fc.weight"]), [g["fc"] for g in grams], 1.0),
                          atol=1e-6)


def test_mats_bad_inputs_give_one_clear_message():
    tv, grams = tv_and_grams()
    with pytest.raises(HyperparameterError, match="mats iters .* ≥ 1 .*got 0"):
        mats_regmean(tv, grams, iters=0)
    with pytest.raises(HyperparameterError, match="alpha .* \\[0, 1\\].*got 1.5"):
        mats_regmean(tv, grams, alpha=1.5)
    with pytest.raises(ValueError, match="one Gram dict per task vector"):
        mats_regmean(tv, grams[:2])
    with pytest.raises(HyperparameterError, match="mats iters"):
        mats_fisher(tv, [{"ln.weight": torch.ones(3, dtype=D)}] * 3, iters=-1)
    with pytest.raises(ConfigError, match="curvature must be one of"):
        MaTSMerge(curvature="kfac")
    with pytest.raises(ConfigError, match="tune keys \\['alpha'\\] do not apply to curvature=fisher"):
        MaTSMerge(curvature="fisher", tune={"alpha": [0.5, 1.0]})


# ---------------------------------------------------------------- RegMean++

class Block(nn.Module):
    """``x + fc2(tanh(fc1 x)) · gain``: two linears, and a parameter that is not a linear weight."""

    def __init__(self, d: int = 3, h: int = 4):
        super().__init__()
        self.fc1, self.fc2, self.gain = nn.Linear(d, h), nn.Linear(h, d), nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(x))) * self.gain * scale


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, scale=0.5)  # a keyword every block receives alike
        return x


def tiny_pool(k: int = 3, seed: int = 0, same_first_block: bool = False):
    """θ0 (a TwoBlocks in float64), K perturbed expert state dicts and K input batch lists."""
    torch.manual_seed(seed)
    model = TwoBlocks().double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    experts = []
    for _ in range(k):
        state = {n: t + 0.3 * torch.randn(t.shape, generator=g, dtype=D) for n, t in model.state_dict().items()}
        if same_first_block:
            state.update({n: t for n, t in model.state_dict().items() if n.startswith("blocks.0.")})
        experts.append(state)
    batches = [[torch.randn(5, 3, generator=g, dtype=D), torch.randn(4, 3, generator=g, dtype=D)] for _ in range(k)]
    return model, experts, batches


def as_model(model: nn.Module, state: dict) -> nn.Module:
    other = TwoBlocks().double().eval()
    other.load_state_dict(state)
    return other


def test_regmean_plusplus_second_block_grams_come_from_the_merged_first_block():
    model, experts, batches = tiny_pool()
    merged, grams = regmean_plusplus(model, experts, batches, alpha=0.9, gram_dtype=D)
    m = as_model(model, merged)
    for k, (expert, task_batches) in enumerate(zip(experts, batches)):
        x = torch.cat(task_batches)
        with torch.no_grad():  # by hand: the merged block 0, then expert k's fc1 of block 1
            y = m.blocks[0](x, scale=0.5)
            h = torch.tanh(y @ expert["blocks.1.fc1.weight"].T + expert["blocks.1.fc1.bias"])
        assert torch.allclose(grams[k]["blocks.1.fc1"], y.T @ y, atol=1e-12)
        assert torch.allclose(grams[k]["blocks.1.fc2"], h.T @ h, atol=1e-12)
    # the merge is RegMean's closed form on those Grams
    assert torch.allclose(merged["blocks.1.fc1.weight"],
                          regmean_merge([e["blocks.1.fc1.weight"] for e in experts],
                                        [g["blocks.1.fc1"] for g in grams], 0.9), atol=1e-12)
    assert torch.allclose(merged["blocks.1.gain"], torch.stack([e["blocks.1.gain"] for e in experts]).mean(0))


def regmean_grams(model, experts, batches):
    """Plain RegMean's Grams: each expert's own forward."""
    return [gram_matrices(as_model(model, e), lambda mod, x: mod(x), b, dtype=D) for e, b in zip(experts, batches)]


def test_regmean_plusplus_equals_regmean_on_the_first_block_and_differs_after():
    model, experts, batches = tiny_pool()
    merged, grams = regmean_plusplus(model, experts, batches, alpha=0.95, gram_dtype=D)
    plain_grams = regmean_grams(model, experts, batches)
    plain = regmean(model.state_dict(), experts, plain_grams, alpha=0.95)
    for k in range(3):
        for name in ("blocks.0.fc1", "blocks.0.fc2"):
            assert torch.allclose(grams[k][name], plain_grams[k][name], atol=1e-12)
        assert not torch.allclose(grams[k]["blocks.1.fc1"], plain_grams[k]["blocks.1.fc1"], atol=1e-3)
    for name in merged:
        if name.startswith("blocks.0."):
            assert torch.allclose(merged[name], plain[name], atol=1e-12), name
    assert not torch.allclose(merged["blocks.1.fc1.weight"], plain["blocks.1.fc1.weight"], atol=1e-4)


def test_regmean_plusplus_equals_regmean_when_the_first_block_is_shared():
    # every expert has the same block 0, so the merged block 0 is it and each task's inputs to block 1 agree
    model, experts, batches = tiny_pool(same_first_block=True)
    merged, _ = regmean_plusplus(model, experts, batches, alpha=0.95, gram_dtype=D)
    plain = regmean(model.state_dict(), experts, regmean_grams(model, experts, batches), alpha=0.95)
    for name in merged:
        assert torch.allclose(merged[name], plain[name], atol=1e-10), name


def test_find_blocks_on_open_clip_and_a_clear_message_without_blocks():
    from open_clip.transformer import VisionTransformer

    vit = VisionTransformer(image_size=8, patch_size=4, width=8, layers=2, heads=2, mlp_ratio=2.0, output_dim=4)
    assert find_blocks(vit) == "transformer.resblocks"
    with pytest.raises(HyperparameterError, match="no nn.ModuleList of blocks; set the method's `blocks`"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_regmean_plusplus_on_an_open_clip_vit_keeps_identical_experts_and_averages_outside_the_blocks():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=8, patch_size=4, width=8, layers=2, heads=2, mlp_ratio=2.0,
                            output_dim=4).double().eval()
    theta0 = vit.state_dict()
    images = [[torch.randn(3, 3, 8, 8, dtype=D)] for _ in range(2)]
    same, grams = regmean_plusplus(vit, [theta0, theta0], images, gram_dtype=D)
    for n, t in theta0.items():
        assert torch.allclose(same[n], t, atol=1e-10), n
    assert sorted(grams[0]) == [f"transformer.resblocks.{i}.mlp.{m}" for i in range(2) for m in ("c_fc", "c_proj")]
    g = torch.Generator().manual_seed(1)
    experts = [{n: t + 0.1 * torch.randn(t.shape, generator=g, dtype=D) for n, t in theta0.items()} for _ in range(2)]
    merged, _ = regmean_plusplus(vit, experts, images, gram_dtype=D)
    for n in ("conv1.weight", "proj", "transformer.resblocks.1.attn.in_proj_weight", "ln_post.bias"):
        assert torch.allclose(merged[n], (experts[0][n] + experts[1][n]) / 2, atol=1e-12), n
