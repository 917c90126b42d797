"""Static merge functions against hand computations and independent (loop-based) implementations."""
from __future__ import annotations

import gc
import logging
import weakref
from functools import partial

import pytest
import torch
from torch import nn

from fusion.merge.combine import task_arithmetic
from fusion.merge.consensus import consensus_mask, consensus_merge, tall_masks
from fusion.merge.family import dare, della, sparse_consensus_merge
from fusion.merge.fisher import diagonal_fisher, fisher_merge, fisher_merge_delta
from fusion.merge.iso import iso_c, iso_cts, iso_cts_factors
from fusion.merge.lines import block_index, lines, lines_alpha, lines_scale
from fusion.merge.opcm import opcm
from fusion.merge.pcb import pcb
from fusion.merge.regmean import default_linear_names, gram_matrices, regmean, regmean_merge
from fusion.merge.sparsify import dare_drop, magnitude, magnitude_trim, magprune_drop, magprune_keep_probabilities
from fusion.merge.ties import ties

D = torch.float64


def random_tv(k: int = 3, seed: int = 0, shapes: dict | None = None) -> dict[str, torch.Tensor]:
    """Stacked float64 task vectors of a tiny model (two matrices, a bias, a LayerNorm-like vector)."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"l0.weight": (5, 4), "l0.bias": (5,), "l1.weight": (3, 5), "ln.weight": (3,)}
    return {n: torch.randn(k, *s, generator=g, dtype=D) for n, s in shapes.items()}


def slow_sign_consensus_sum(tv: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Elect sign(Σ_k) per entry and sum the agreeing entries, with Python loops."""
    out = {}
    for n, t in tv.items():
        flat, res = t.reshape(t.shape[0], -1), torch.zeros(t[0].numel(), dtype=t.dtype)
        for j in range(flat.shape[1]):
            column = [float(v) for v in flat[:, j]]
            sign = (sum(column) > 0) - (sum(column) < 0)
            res[j] = sum(v for v in column if sign != 0 and ((v > 0) - (v < 0)) == sign)
        out[n] = res.reshape(t.shape[1:])
    return out


# ---------------------------------------------------------------- sparsify → consensus → scale family

def test_family_without_sparsifier_or_consensus_is_task_arithmetic():
    tv = random_tv()
    got = sparse_consensus_merge(tv, sparsify=None, consensus=False, lam=0.4)
    for n, t in tv.items():
        assert torch.allclose(got[n], 0.4 * t.sum(0), atol=1e-15)
        assert torch.equal(got[n], task_arithmetic(tv, 0.4)[n])


def test_ties_known_small_example():
    # one model split over two tensors; trim k = 0.6 keeps the top 3 of 5 entries per task over the whole model
    t = torch.tensor([[4, -1, 2, 0.5, -3], [-2, 3, -1, 5, 1], [3, -2, -6, 0.2, 1]], dtype=D)
    tv = {"a": t[:, :2], "b": t[:, 2:]}
    # trimmed: [4,0,2,0,-3], [-2,3,0,5,0], [3,-2,-6,0,0]; signs of the sum [5,1,-4,5,-3]: + + - + -
    # agreeing entries: c0 {4,3}, c1 {3}, c2 {-6}, c3 {5}, c4 {-3}
    summed = ties(tv, k=0.6, lam=0.5, aggregate="sum")
    mean = ties(tv, k=0.6, lam=0.5, aggregate="mean")
    assert torch.equal(torch.cat([summed["a"], summed["b"]]), torch.tensor([3.5, 1.5, -3, 2.5, -1.5], dtype=D))
    assert torch.equal(torch.cat([mean["a"], mean["b"]]), torch.tensor([1.75, 1.5, -3, 2.5, -1.5], dtype=D))
    ta = task_arithmetic(tv, 0.5)
    assert not torch.allclose(torch.cat([ta["a"], ta["b"]]), torch.cat([summed["a"], summed["b"]]))


def test_ties_with_one_task_is_trimmed_task_arithmetic():
    tv = random_tv(k=1)
    got, trimmed = ties(tv, k=0.3, lam=0.7), magnitude_trim(tv, 0.3)
    nonzero = sum(int((t != 0).sum()) for t in trimmed.values())
    assert nonzero == -(-0.3 * sum(t.numel() for t in tv.values()) // 1)  # ceil(k·P)
    for n in tv:
        assert torch.allclose(got[n], 0.7 * trimmed[n][0], atol=1e-15)
    assert magnitude is magnitude_trim


def test_dare_survivors_are_exactly_rescaled_and_drop_rate_is_p():
    tv = random_tv(shapes={"w": (40, 50), "b": (50,)})
    p = 0.3
    out = dare_drop(tv, p=p, seed=7)
    kept = total = 0
    for n, t in tv.items():
        mask = out[n] != 0
        assert torch.equal(out[n][mask], t[mask] / (1 - p))
        kept, total = kept + int(mask.sum()), total + mask.numel()
    assert abs((1 - kept / total) - p) < 0.02  # 6150 entries: std of the drop rate ≈ 0.006
    again, other = dare_drop(tv, p=p, seed=7), dare_drop(tv, p=p, seed=8)
    assert all(torch.equal(again[n], out[n]) for n in tv)
    assert not all(torch.equal(other[n], out[n]) for n in tv)


def test_dare_is_unbiased_over_seeds():
    tv = random_tv(shapes={"w": (4, 5)})
    n_seeds, p = 400, 0.5
    mean = sum(dare_drop(tv, p=p, seed=s)["w"] for s in range(n_seeds)) / n_seeds
    # per entry: var = τ²·p/(1−p) = τ², so the mean over 400 seeds has std |τ|/20; allow 5 std
    assert bool(((mean - tv["w"]).abs() <= 5 * tv["w"].abs() / 20 + 1e-12).all())
    assert float((mean - tv["w"]).norm() / tv["w"].norm()) < 0.15  # expected ≈ 0.05


def test_dare_presets_match_their_definition():
    tv = random_tv()
    plain = dare(tv, p=0.5, seed=3)  # TA at λ = 0.3
    dropped = dare_drop(tv, p=0.5, seed=3)
    for n in tv:
        assert torch.allclose(plain[n], 0.3 * dropped[n].sum(0), atol=1e-14)
    with_ties = dare(tv, p=0.5, consensus=True, k=0.5, seed=3)  # drop → trim → TIES sum at λ = 0.5
    expected = slow_sign_consensus_sum(magnitude_trim(dropped, 0.5))
    for n in tv:
        assert torch.allclose(with_ties[n], 0.5 * expected[n], atol=1e-14)
        assert not torch.allclose(with_ties[n], task_arithmetic(tv, 0.5)[n])


def test_magprune_keep_probabilities_by_hand():
    t = torch.tensor([[[0.1, -3, 2, 0.5], [1, 2, 3, 4]]], dtype=D)  # one task, a 2-D weight with 2 rows
    q = magprune_keep_probabilities(t, density=0.5, epsilon=0.2)
    # row 0 magnitude ranks 0,3,2,1 of 3 → keep = 1 − (0.5 + 0.1 − 0.2·r/3) = 0.4 + 0.2·r/3
    expected = torch.tensor([[[0.4, 0.6, 0.4 + 0.4 / 3, 0.4 + 0.2 / 3], [0.4, 0.4 + 0.2 / 3, 0.4 + 0.4 / 3, 0.6]]])
    assert torch.allclose(q, expected.to(D), atol=1e-12)
    vec = magprune_keep_probabilities(torch.tensor([[5.0, -1.0, 3.0]]), 0.5, 0.2)  # 1-D: whole tensor is a row
    assert torch.allclose(vec, torch.tensor([[0.6, 0.4, 0.5]], dtype=D))


def test_magprune_keeps_larger_entries_more_often_and_is_unbiased():
    row = torch.linspace(0.1, 2.0, 11, dtype=D) * torch.tensor([1, -1] * 5 + [1], dtype=D)
    tv = {"w": row.reshape(1, 1, 11)}
    density, eps, n_seeds = 0.5, 0.8, 600
    draws = torch.stack([magprune_drop(tv, density, eps, seed=s)["w"].reshape(11) for s in range(n_seeds)])
    freq = (draws != 0).double().mean(0)
    expected = 0.1 + 0.8 * torch.arange(11, dtype=D) / 10  # keep prob by magnitude rank
    assert bool(((freq - expected).abs() < 4 * (expected * (1 - expected) / n_seeds).sqrt() + 1e-9).all())
    assert float(freq[-3:].mean()) > float(freq[:3].mean()) + 0.4
    kept = draws != 0
    assert torch.allclose(draws[kept], (row / expected).expand(n_seeds, 11)[kept])  # survivors × 1/(1 − p_i)
    assert bool(((draws.mean(0) - row).abs() < 0.35 * row.abs() + 0.05).all())


def test_della_is_magprune_then_ties_consensus():
    tv = random_tv()
    got = della(tv, density=0.6, epsilon=0.2, lam=0.3, seed=5)
    expected = slow_sign_consensus_sum(magprune_drop(tv, 0.6, 0.2, seed=5))
    for n in tv:
        assert torch.allclose(got[n], 0.3 * expected[n], atol=1e-14)
        assert not torch.allclose(got[n], task_arithmetic(tv, 0.3)[n])


# ---------------------------------------------------------------- TALL masks and Consensus

def test_tall_masks_and_consensus_by_hand():
    t = torch.tensor([[1, -2, 0.25, 3], [1, 2, -0.25, 0], [-1, 0.5, 0.5, 1]], dtype=D)
    tv = {"w": t}  # τ_MTL = Σ τ = [1, 0.5, 0.5, 4]
    masks = tall_masks(tv, None, lambdas=[0.5, 0.5, 0.6])["w"]
    # t1: |τ|=[1,2,.25,3] vs .5·|MTL−τ|=[0,1.25,.125,.5]; t2: [1,2,.25,0] vs [0,.75,.375,2];
    # t3: [1,.5,.5,1] vs .6·[2,0,0,3]=[1.2,0,0,1.8]
    expected = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(masks, expected)
    assert torch.equal(consensus_mask({"w": masks}, k=2)["w"], torch.tensor([True, True, True, False]))
    got = consensus_merge(tv, k=2, lam=1.0, lambdas=[0.5, 0.5, 0.6])["w"]
    assert torch.equal(got, torch.tensor([1, 0.5, 0.5, 0], dtype=D))
    got3 = consensus_merge(tv, k=3, lam=2.0, lambdas=[0.5, 0.5, 0.6])["w"]
    assert torch.equal(got3, torch.tensor([0, 1.0, 0, 0], dtype=D))


def test_consensus_ties_masks_the_ties_merge():
    tv = random_tv(k=4)
    mtl = ties(tv, k=0.4, lam=1.0)
    got = consensus_merge(tv, k=2, lam=0.7, base="ties", lambdas=0.3, ties_k=0.4)
    for n, t in tv.items():
        counts = torch.zeros_like(t[0])
        for task in t:  # independent mask count
            counts += (task.abs() >= 0.3 * (mtl[n] - task).abs()).double()
        assert torch.allclose(got[n], 0.7 * mtl[n] * (counts >= 2), atol=1e-15)
    assert any(not torch.allclose(got[n], 0.7 * mtl[n]) for n in tv)


# ---------------------------------------------------------------- LiNeS

@pytest.mark.parametrize("name, index", [
    ("transformer.resblocks.3.attn.in_proj_weight", 3),
    ("visual.transformer.resblocks.11.mlp.c_fc.weight", 11),
    ("vision_model.encoder.layers.7.self_attn.q_proj.weight", 7),
    ("encoder.layers.0.layer_norm1.bias", 0),
    ("conv1.weight", None), ("ln_post.weight", None), ("vision_model.post_layernorm.weight", None),
    ("transformer.resblocks_x.2.w", None), ("body.h.1.mlp.c_fc.weight", 1), ("body.wte.weight", None),
    ("model.model.layers.5.self_attn.q_proj.weight", 5), ("body.encoder.layer.2.output.dense.weight", 2),
    ("model.decoder.block.3.layer.1.EncDecAttention.q.weight", 3), ("blocks.4.mlp.fc1.weight", 4),
])
def test_block_index(name, index):
    assert block_index(name) == index


def test_lines_scales_first_block_by_alpha_and_last_by_alpha_plus_beta():
    g = torch.Generator().manual_seed(0)
    names = [f"transformer.resblocks.{i}.mlp.c_fc.weight" for i in range(4)] + ["conv1.weight", "ln_post.bias"]
    delta = {n: torch.randn(3, 2, generator=g, dtype=D) for n in names}
    out = lines_scale(delta, alpha=0.2, beta=0.6)
    assert torch.equal(out[names[0]], delta[names[0]] * 0.2)
    assert torch.equal(out[names[3]], delta[names[3]] * (0.2 + 0.6))
    assert torch.allclose(out[names[1]], delta[names[1]] * 0.4, atol=1e-15)
    assert torch.equal(out["conv1.weight"], delta["conv1.weight"] * 0.2)
    explicit = lines_scale(delta, alpha=0.2, beta=0.6, num_blocks=12)
    assert torch.allclose(explicit[names[3]], delta[names[3]] * (0.2 + 0.6 * 3 / 11), atol=1e-15)
    with pytest.raises(ValueError, match="num_blocks=2"):
        lines_scale(delta, alpha=0.2, beta=0.6, num_blocks=2)


def test_lines_alpha_and_merge():
    tv = random_tv(k=4, shapes={"encoder.layers.0.w": (3, 3), "encoder.layers.1.w": (3, 3), "embed": (3,)})
    assert lines_alpha(tv, {n: t.sum(0) for n, t in tv.items()}) == pytest.approx(0.25)  # TA: 1/T
    mtl = ties(tv, k=0.5, lam=1.0)
    norm = lambda d: float(torch.sqrt(sum((v ** 2).sum() for v in d.values())))  # noqa: E731
    expected_alpha = norm({n: t.sum(0) for n, t in tv.items()}) / norm(mtl) / 4
    assert lines_alpha(tv, mtl) == pytest.approx(expected_alpha, rel=1e-12)
    got = lines(tv, beta=0.5, base=partial(ties, k=0.5, lam=1.0))
    assert torch.allclose(got["encoder.layers.0.w"], expected_alpha * mtl["encoder.layers.0.w"])
    assert torch.allclose(got["encoder.layers.1.w"], (expected_alpha + 0.5) * mtl["encoder.layers.1.w"])


# ---------------------------------------------------------------- Iso-C / Iso-CTS

def test_iso_c_has_a_flat_spectrum():
    tv = random_tv(k=3)
    out = iso_c(tv, alpha=1.5)
    s = torch.linalg.svdvals(out["l0.weight"])
    expected = 1.5 * torch.linalg.svdvals(tv["l0.weight"].sum(0)).mean()
    assert torch.allclose(s, expected.expand_as(s), atol=1e-12)
    assert torch.allclose(out["l0.bias"], 1.5 * tv["l0.bias"].mean(0))  # non-matrix: averaged
    assert not torch.allclose(out["l0.weight"], 1.5 * tv["l0.weight"].sum(0))
    # same singular vectors as Σ τ: the projection onto Σ τ's top direction keeps its sign
    u, _, vh = torch.linalg.svd(tv["l0.weight"].sum(0))
    assert float(u[:, 0] @ out["l0.weight"] @ vh[0]) == pytest.approx(float(expected), rel=1e-10)


def test_iso_cts_shapes_orthonormal_factors_and_flat_spectrum():
    tv = random_tv(k=3, shapes={"w": (6, 8), "b": (6,)})
    u, s, vh = iso_cts_factors(tv["w"], common_space_fraction=0.5)
    assert u.shape == (6, 6) and s.shape == (6,) and vh.shape == (6, 8)
    assert torch.allclose(u.T @ u, torch.eye(6, dtype=D), atol=1e-10)
    assert torch.allclose(vh @ vh.T, torch.eye(6, dtype=D), atol=1e-10)
    assert torch.allclose(s, s[0].expand(6))
    out = iso_cts(tv, alpha=1.5, common_space_fraction=0.5)
    assert out["w"].shape == (6, 8) and out["b"].shape == (6,)
    sv = torch.linalg.svdvals(out["w"])
    assert torch.allclose(sv, sv[0].expand(6), atol=1e-10)
    assert not torch.allclose(out["w"], iso_c(tv, alpha=1.5)["w"], atol=1e-3)
    # with the whole rank as common subspace, Iso-CTS reduces to Iso-C
    assert torch.allclose(iso_cts(tv, 1.5, common_space_fraction=1.0)["w"], iso_c(tv, 1.5)["w"], atol=1e-10)


# ---------------------------------------------------------------- PCB

def slow_pcb(t: torch.Tensor, ratio: float, lam: float, clip: float) -> torch.Tensor:
    """PCB on ``t: [K, P]`` with Python lists, following the reference script line by line."""
    k, p = t.shape
    rows = [[float(v) for v in r] for r in t]

    def clamp(row, lo_r, hi_r):
        s = sorted(row)
        lo, hi = s[int(p * lo_r)], s[int(p * (1 - hi_r) - 1)]
        return [min(max(v, lo), hi) for v in row]

    def norm(row):
        lo, hi = min(row), max(row)
        return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in row]

    sgn = lambda v: (v > 0) - (v < 0)  # noqa: E731
    mags = [clamp([abs(v) for v in r], clip, clip) for r in rows]
    nmag = [norm(m) for m in mags]
    summed = [sum(sgn(rows[i][j]) * nmag[i][j] for i in range(k)) for j in range(p)]
    import math
    scores = [[math.exp(k * nmag[i][j] ** 2) * math.tanh(rows[i][j] * summed[j]) for j in range(p)] for i in range(k)]
    w = [norm(clamp(sc, 1 - ratio, 0.0)) for sc in scores]
    out = []
    for j in range(p):
        den = max(sum(w[i][j] for i in range(k)), 1e-12)
        out.append(sum(lam * w[i][j] * sgn(rows[i][j]) * mags[i][j] for i in range(k)) / den)
    return torch.tensor(out, dtype=D)


@pytest.mark.parametrize("shapes, ratio", [({"a": (4, 3), "b": (8,)}, 0.3), ({"a": (20, 15), "b": (40,)}, 0.05)])
def test_pcb_matches_a_slow_implementation(shapes, ratio):
    tv = random_tv(k=3, shapes=shapes, seed=11)
    got = pcb(tv, ratio=ratio, lam=1.2, clip=0.01)
    flat = torch.cat([t.reshape(3, -1) for t in tv.values()], dim=1)
    expected = slow_pcb(flat, ratio, 1.2, 0.01)
    assert torch.allclose(torch.cat([got["a"].reshape(-1), got["b"]]), expected, atol=1e-12)
    assert int((expected != 0).sum()) > 0
    assert not torch.allclose(got["a"], task_arithmetic(tv, 1.2)["a"])


# ---------------------------------------------------------------- OPCM

def experts_from(theta0: dict, taus: torch.Tensor | dict) -> list[dict]:
    k = next(iter(taus.values())).shape[0]
    return [{n: theta0[n] + taus[n][i] for n in theta0} for i in range(k)]


def test_opcm_first_model_alone_is_its_task_vector():
    tv = random_tv(k=1)
    theta0 = {n: torch.zeros_like(t[0]) + 0.5 for n, t in tv.items()}
    got = opcm(theta0, iter(experts_from(theta0, tv)))
    for n in tv:
        assert torch.allclose(got[n], tv[n][0], atol=1e-12)


def slow_opcm_two(tv: dict, alpha: float) -> dict:
    """OPCM for two experts written out directly."""
    out = {}
    for n, t in tv.items():
        if t.dim() == 3:
            u, s, vh = torch.linalg.svd(t[0], full_matrices=True)
            share, r = torch.cumsum(s, 0) / s.sum(), 0
            while float(share[r]) <= alpha:
                r += 1
            p = u.T @ t[1] @ vh.T
            for i in range(min(p.shape)):
                p[i, i] = 0
            for i in range(r):
                for j in range(r):
                    p[i, j] = 0
            out[n] = t[0] + u @ p @ vh
        else:
            out[n] = t[0] + t[1]
    mean_norm = (sum(float((t[0] ** 2).sum()) for t in tv.values()) ** 0.5
                 + sum(float((t[1] ** 2).sum()) for t in tv.values()) ** 0.5) / 2
    norm = sum(float((v ** 2).sum()) for v in out.values()) ** 0.5
    return {n: v * mean_norm / norm for n, v in out.items()}


def test_opcm_two_experts_match_a_direct_implementation():
    tv = random_tv(k=2, shapes={"l0.weight": (12, 10), "l0.bias": (12,), "l1.weight": (6, 8)})
    s = torch.linalg.svdvals(tv["l0.weight"][0])
    assert int((torch.cumsum(s, 0) / s.sum() > 0.5).double().argmax()) >= 2  # P[:r, :r] is more than the diagonal
    theta0 = {n: torch.ones_like(t[0]) for n, t in tv.items()}
    got = opcm(theta0, iter(experts_from(theta0, tv)), alpha=0.5)
    expected = slow_opcm_two(tv, 0.5)
    for n in tv:
        assert torch.allclose(got[n], expected[n], atol=1e-10)
    ta = {n: t.sum(0) for n, t in tv.items()}
    assert not torch.allclose(got["l0.weight"] / got["l0.weight"].norm(), ta["l0.weight"] / ta["l0.weight"].norm())
    got_norm = float(torch.sqrt(sum((v ** 2).sum() for v in got.values())))
    mean_norm = sum(float(torch.sqrt(sum((t[i] ** 2).sum() for t in tv.values()))) for i in range(2)) / 2
    assert got_norm == pytest.approx(mean_norm, rel=1e-12)  # rescaled to the running mean norm


def test_opcm_cleaned_update_avoids_the_protected_subspace():
    from fusion.merge.opcm import project_update, split_rank
    g = torch.Generator().manual_seed(3)
    prev, tau = torch.randn(12, 10, generator=g, dtype=D), torch.randn(12, 10, generator=g, dtype=D)
    u, s, vh = torch.linalg.svd(prev)
    r = split_rank(s, 0.5)
    assert 2 <= r < 10 and float((s[:r + 1].sum()) / s.sum()) > 0.5 >= float(s[:r].sum() / s.sum())
    clean = project_update(prev, tau, 0.5)
    block = u[:, :r].T @ clean @ vh[:r].T
    assert torch.allclose(block, torch.zeros_like(block), atol=1e-12)
    diag = torch.diagonal(u.T @ clean @ vh.T)
    assert torch.allclose(diag, torch.zeros_like(diag), atol=1e-12)
    assert not torch.allclose(clean, tau)


def _live_tensor_profile(k: int) -> tuple[int, int]:
    """Run OPCM over a generator of K fresh experts; return (max live tensors, max live earlier experts' tensors)."""
    theta0 = {f"w{i}": torch.zeros(6, 5) for i in range(3)} | {"b": torch.zeros(5)}
    refs: list[weakref.ref] = []
    peak_live, peak_stale = 0, 0

    def generate():
        nonlocal peak_live, peak_stale
        for i in range(k):
            gc.collect()
            peak_stale = max(peak_stale, sum(r() is not None for r in refs))
            peak_live = max(peak_live, sum(type(o) in (torch.Tensor, nn.Parameter) for o in gc.get_objects()))
            g = torch.Generator().manual_seed(i)
            expert = {n: torch.randn(t.shape, generator=g) for n, t in theta0.items()}
            refs.extend(weakref.ref(t) for t in expert.values())
            yield expert
            del expert

    opcm(theta0, generate())
    return peak_live, peak_stale


def test_opcm_memory_is_constant_in_the_number_of_experts():
    live2, stale2 = _live_tensor_profile(2)
    live6, stale6 = _live_tensor_profile(6)
    assert stale2 == 0 and stale6 == 0  # an expert is released before the next one is requested
    assert live6 <= live2  # no tensor accumulates per expert


# ---------------------------------------------------------------- RegMean

def test_regmean_single_task_alpha_one_returns_the_weight():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(20, 4, generator=g, dtype=D), torch.randn(3, 4, generator=g, dtype=D)
    assert torch.allclose(regmean_merge([w], [x.T @ x], alpha=1.0), w, atol=1e-12)


def test_regmean_equals_the_least_squares_solution():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 5, generator=g, dtype=D) for n in (12, 7, 9)]
    ws = [torch.randn(3, 5, generator=g, dtype=D) for _ in xs]
    got = regmean_merge(ws, [x.T @ x for x in xs], alpha=1.0)
    a, b = torch.cat(xs), torch.cat([x @ w.T for x, w in zip(xs, ws)])
    expected = torch.linalg.lstsq(a, b).solution.T  # min Σ_k ‖X_k Wᵀ − X_k W_kᵀ‖²
    assert torch.allclose(got, expected, atol=1e-10)
    assert not torch.allclose(got, torch.stack(ws).mean(0), atol=1e-3)
    # α < 1: the same normal equations with off-diagonals scaled by α
    gt = [0.9 * x.T @ x + 0.1 * torch.diag(torch.diagonal(x.T @ x)) for x in xs]
    expected_a = torch.linalg.inv(sum(gt)) @ sum(gi @ w.T for gi, w in zip(gt, ws))
    assert torch.allclose(regmean_merge(ws, [x.T @ x for x in xs], alpha=0.9), expected_a.T, atol=1e-10)


def test_regmean_singular_gram_is_regularised_with_a_warning(caplog):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2, generator=g, dtype=D) @ torch.randn(2, 4, generator=g, dtype=D)  # rank 2 inputs in R^4
    w = torch.randn(3, 4, generator=g, dtype=D)
    with caplog.at_level(logging.WARNING, logger="fusion.merge.regmean"):
        got = regmean_merge([w], [x.T @ x], alpha=1.0)
    assert bool(torch.isfinite(got).all())
    assert "singular" in caplog.text and "ridge" in caplog.text
    assert torch.allclose(x @ got.T, x @ w.T, atol=1e-4)  # exact on the directions the data excites
    with caplog.at_level(logging.WARNING, logger="fusion.merge.regmean"):
        zero = regmean_merge([w, 2 * w], [torch.zeros(4, 4, dtype=D)] * 2)
    assert torch.allclose(zero, 1.5 * w) and "simple average" in caplog.text


class TinyBlock(nn.Module):
    """An MLP plus an nn.MultiheadAttention (whose out_proj forward is never called)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.attn = nn.MultiheadAttention(3, 1)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.fc2(torch.relu(self.fc1(x)))


def test_gram_matrices_collect_xtx_of_each_linear_input():
    torch.manual_seed(0)
    model = TinyBlock().double()
    batches = [torch.randn(5, 2, 3, dtype=D), torch.randn(4, 2, 3, dtype=D)]  # [tokens, batch, dim]
    assert default_linear_names(model) == ["fc1", "fc2"]
    grams = gram_matrices(model, lambda m, b: m(b), batches, dtype=D)
    x1 = torch.cat([(b + model.attn(b, b, b)[0]).reshape(-1, 3) for b in batches]).detach()
    h = torch.relu(model.fc1(x1)).detach()
    assert torch.allclose(grams["fc1"], x1.T @ x1, atol=1e-10)
    assert torch.allclose(grams["fc2"], h.T @ h, atol=1e-10)
    with pytest.raises(ValueError, match="attn.out_proj"):
        gram_matrices(model, lambda m, b: m(b), batches, ["fc1", "attn.out_proj"])
    with pytest.raises(ValueError, match="not an nn.Linear"):
        gram_matrices(model, lambda m, b: m(b), batches, ["attn"])


def test_regmean_whole_model_merges_linear_weights_and_averages_the_rest():
    torch.manual_seed(1)
    models = [TinyBlock().double() for _ in range(2)]
    batches = [[torch.randn(6, 2, 3, dtype=D)] for _ in models]
    grams = [gram_matrices(m, lambda m, b: m(b), bs, dtype=D) for m, bs in zip(models, batches)]
    experts = [{n: v.detach() for n, v in m.state_dict().items()} for m in models]
    pretrained = {n: torch.zeros_like(v) for n, v in experts[0].items()}
    merged = regmean(pretrained, experts, grams, alpha=0.95)
    expected_fc1 = regmean_merge([e["fc1.weight"] for e in experts], [g["fc1"] for g in grams], 0.95)
    assert torch.allclose(merged["fc1.weight"], expected_fc1)
    assert not torch.allclose(merged["fc1.weight"], (experts[0]["fc1.weight"] + experts[1]["fc1.weight"]) / 2)
    for n in ("fc1.bias", "attn.in_proj_weight", "attn.out_proj.weight"):
        assert torch.allclose(merged[n], (experts[0][n] + experts[1][n]) / 2)


# ---------------------------------------------------------------- Fisher

def test_fisher_merge_with_equal_fishers_is_the_simple_average():
    tv = random_tv(k=3)
    theta0 = {n: torch.zeros_like(t[0]) for n, t in tv.items()}
    experts = experts_from(theta0, tv)
    fisher = {n: torch.rand(t[0].shape, dtype=D) for n, t in tv.items()}
    for normalize in (True, False):
        merged = fisher_merge(theta0, experts, [fisher] * 3, normalize=normalize)
        for n, t in tv.items():
            assert torch.allclose(merged[n], t.mean(0), atol=1e-12)


def test_fisher_merge_weighted_by_hand():
    theta0 = {"w": torch.zeros(2, dtype=D)}
    experts = {"w": torch.tensor([[1.0, 1.0], [3.0, 3.0]], dtype=D)}  # already stacked
    fishers = {"w": torch.tensor([[1.0, 3.0], [3.0, 1.0]], dtype=D)}
    merged = fisher_merge(theta0, experts, fishers, floor=0.0, normalize=False)
    assert torch.allclose(merged["w"], torch.tensor([(1 + 9) / 4, (3 + 3) / 4], dtype=D))
    # normalisation removes a model's global Fisher scale: F2 = 2·F1 weighs both equally
    scaled = {"w": torch.tensor([[1.0, 3.0], [2.0, 6.0]], dtype=D)}
    assert torch.allclose(fisher_merge(theta0, experts, scaled, floor=0.0)["w"], torch.tensor([2.0, 2.0], dtype=D))
    unnormalised = fisher_merge(theta0, experts, scaled, floor=0.0, normalize=False)["w"]
    assert torch.allclose(unnormalised, torch.tensor([7 / 3, 7 / 3], dtype=D))
    delta = fisher_merge_delta({"w": torch.ones(2, dtype=D)}, experts, fishers, floor=0.0, normalize=False)
    assert torch.allclose(delta["w"], merged["w"] - 1)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _loop_fisher(model: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-example autograd loop: mean over examples of (∂ log p(y|x) / ∂θ)²."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    count = 0
    for x, y in zip(xs, ys):
        for xi, yi in zip(x, y):
            model.zero_grad()
            torch.log_softmax(model(xi[None]), -1)[0, yi].backward()
            for n, p in model.named_parameters():
                total[n] += p.grad ** 2
            count += 1
    return {n: t / count for n, t in total.items()}


@pytest.mark.parametrize("vectorize", [True, False])
def test_diagonal_fisher_matches_a_per_example_loop(vectorize):
    model = _mlp()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(5, 4, generator=g, dtype=D), torch.randn(3, 4, generator=g, dtype=D)]
    ys = [torch.randint(0, 3, (5,), generator=g), torch.randint(0, 3, (3,), generator=g)]
    params = dict(model.named_parameters())
    got = diagonal_fisher(model, params, lambda m, x: m(x), xs, labels=ys, vectorize=vectorize)
    expected = _loop_fisher(model, xs, ys)
    for n in expected:
        assert torch.allclose(got[n], expected[n], atol=1e-12)
    # unlabeled: y ~ softmax(logits) with a Generator seeded by `seed`, one draw per example, batches in order
    sampler = torch.Generator().manual_seed(4)
    sampled = [torch.multinomial(torch.softmax(model(x), -1).detach(), 1, generator=sampler).squeeze(1) for x in xs]
    got_u = diagonal_fisher(model, params, lambda m, x: m(x), xs, seed=4, vectorize=vectorize)
    expected_u = _loop_fisher(model, xs, sampled)
    for n in expected_u:
        assert torch.allclose(got_u[n], expected_u[n], atol=1e-12)
    assert any(not torch.allclose(got_u[n], got[n]) for n in got)


# ---------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("call, fragment", [
    (lambda tv: magnitude_trim(tv, 0.0), "0.0"),
    (lambda tv: ties(tv, k=1.5), "1.5"),
    (lambda tv: dare_drop(tv, p=1.0), "1.0"),
    (lambda tv: dare(tv, p=-0.1), "-0.1"),
    (lambda tv: magprune_drop(tv, density=0.5, epsilon=1.2), "epsilon=1.2"),
    (lambda tv: della(tv, density=0.0), "0.0"),
    (lambda tv: iso_c(tv, alpha=0.0), "0.0"),
    (lambda tv: iso_cts(tv, common_space_fraction=1.3), "1.3"),
    (lambda tv: pcb(tv, ratio=2.0), "2.0"),
    (lambda tv: consensus_merge(tv, k=1.5), "1.5"),
    (lambda tv: consensus_merge(tv, lambdas=[0.1, 0.2]), "[0.1, 0.2]"),
    (lambda tv: opcm({"w": torch.zeros(2)}, [{"w": torch.ones(2)}], alpha=1.5), "1.5"),
    (lambda tv: opcm({"w": torch.zeros(2)}, iter([])), "empty"),
    (lambda tv: regmean_merge([torch.eye(2)], [torch.eye(2)], alpha=1.2), "1.2"),
])
def test_bad_hyperparameters_raise_with_the_value(call, fragment):
    with pytest.raises(ValueError) as err:
        call(random_tv(k=3))
    assert fragment in str(err.value)


@pytest.mark.parametrize("method, call", [
    ("consensus_merge", lambda tv: consensus_merge(tv)),
    ("iso_cts", lambda tv: iso_cts(tv)),
    ("pcb", lambda tv: pcb(tv)),
])
def test_methods_that_need_two_experts_reject_one(method, call):
    with pytest.raises(ValueError) as err:
        call(random_tv(k=1))
    assert method in str(err.value) and "K=1" in str(err.value)
