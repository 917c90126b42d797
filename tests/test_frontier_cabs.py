"""CABS (Yang et al., ICML 2025): conflict-aware, balanced (n:m) sparsification, its TA preset and config wiring."""
from __future__ import annotations

import math

import pytest
import torch

from fusion.merge.cabs import cabs_sparsify
from fusion.merge.combine import task_arithmetic
from fusion.merge.family import cabs
from fusion.merge.task_vectors import HyperparameterError


def pool(k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(k, 4, 12, generator=g, dtype=torch.float64),
            "conv": torch.randn(k, 2, 3, 2, 2, generator=g, dtype=torch.float64),
            "b": torch.randn(k, 7, generator=g, dtype=torch.float64),
            "scalar": torch.randn(k, generator=g, dtype=torch.float64)}


def slow_cabs(tv, n, m, order):
    """Independent loop implementation: rows × blocks × tasks, choosing by a Python sort."""
    out = {}
    for name, t in tv.items():
        k = t.shape[0]
        rows = t.reshape(k, t.shape[1], -1) if t.dim() > 2 else t.reshape(k, 1, -1)
        res = torch.zeros_like(rows)
        for r in range(rows.shape[1]):
            width = rows.shape[2]
            for start in range(0, width, m):
                cols = list(range(start, min(start + m, width)))
                quota = n if len(cols) == m else math.ceil(n * len(cols) / m)
                taken = set()
                for task in order:
                    free = sorted((c for c in cols if c not in taken), key=lambda c: -abs(float(rows[task, r, c])))
                    for c in free[:quota]:
                        res[task, r, c] = rows[task, r, c]
                        if rows[task, r, c] != 0:  # a zero entry leaves its position free
                            taken.add(c)
        out[name] = res.reshape(t.shape)
    return out


def test_hand_example_two_tasks_one_row():
    # one row of 4, m=4, n=2: task 0 keeps its top 2 (|4|, |3|); task 1 chooses among the other two positions
    tv = {"w": torch.tensor([[[1.0, -4.0, 3.0, 0.5]], [[9.0, 8.0, -0.1, 0.2]]], dtype=torch.float64)}
    got = cabs_sparsify(tv, n=2, m=4)["w"]
    assert torch.equal(got, torch.tensor([[[0.0, -4.0, 3.0, 0.0]], [[9.0, 0.0, 0.0, 0.2]]], dtype=torch.float64))
    # the reverse order lets task 1 take its own top 2 first
    got = cabs_sparsify(tv, n=2, m=4, order=[1, 0])["w"]
    assert torch.equal(got, torch.tensor([[[0.0, 0.0, 3.0, 0.5]], [[9.0, 8.0, 0.0, 0.0]]], dtype=torch.float64))
    # TA over the disjoint vectors: λ·(τ̂_0 + τ̂_1)
    assert torch.equal(cabs(tv, density=None, n=2, m=4, lam=0.5)["w"],
                       torch.tensor([[4.5, -2.0, 1.5, 0.1]], dtype=torch.float64))


@pytest.mark.parametrize("n,m,order", [(1, 4, None), (2, 4, [2, 0, 1]), (3, 5, [1, 2, 0]), (2, 8, None)])
def test_matches_slow_loop_implementation(n, m, order):
    tv = pool()
    got = cabs_sparsify(tv, n=n, m=m, order=order)
    expected = slow_cabs(tv, n, m, order or [0, 1, 2])
    for name in tv:
        assert torch.equal(got[name], expected[name]), name


def test_kept_sets_are_disjoint_and_exactly_n_per_block():
    tv = {"w": torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)}
    got = cabs_sparsify(tv, density=0.25, m=4)["w"]  # n = 1, K·n = m: the 4 tasks tile every block
    kept = got != 0
    assert int(kept.sum(0).max()) == 1  # no position kept by two tasks
    per_block = kept.reshape(4, 6, 4, 4).sum(-1)
    assert torch.equal(per_block, torch.ones_like(per_block))  # exactly n = 1 per block, per task
    assert bool(kept.any(0).all())  # K·n = m: every position is used by exactly one task
    # and differs from TA: each position holds one task's value, not the sum
    assert not torch.allclose(cabs(tv, density=0.25, m=4, lam=0.3)["w"], task_arithmetic(tv, 0.3)["w"])


def test_kept_entries_are_top_magnitude_of_the_available_ones():
    tv = pool(k=2, seed=3)
    got = cabs_sparsify(tv, n=2, m=6)
    first, second = got["w"][0], got["w"][1]
    for r in range(4):
        for start in range(0, 12, 6):
            block0, block1 = first[r, start:start + 6], second[r, start:start + 6]
            orig0, orig1 = tv["w"][0, r, start:start + 6], tv["w"][1, r, start:start + 6]
            assert set(orig0.abs().topk(2).indices.tolist()) == set(block0.nonzero().flatten().tolist())
            free = orig1.abs().masked_fill(block0 != 0, -1)
            assert set(free.topk(2).indices.tolist()) == set(block1.nonzero().flatten().tolist())


def test_partial_last_block_keeps_ceil_share_and_single_task_is_plain_nm():
    t = torch.arange(1.0, 11.0, dtype=torch.float64).reshape(1, 1, 10)  # width 10, m = 4: blocks of 4, 4, 2
    got = cabs_sparsify({"w": t}, n=2, m=4)["w"].flatten()
    assert got.nonzero().flatten().tolist() == [2, 3, 6, 7, 9]  # the last block of r=2 keeps ceil(2·2/4) = 1
    assert torch.equal(got[[2, 3, 6, 7, 9]], t.flatten()[[2, 3, 6, 7, 9]])
    # one task: plain n:m magnitude pruning of every row
    w = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    single = cabs_sparsify({"w": w}, n=1, m=4)["w"]
    blocks = w.reshape(3, 2, 4)
    expected = torch.zeros_like(blocks).scatter(-1, blocks.abs().argmax(-1, keepdim=True),
                                                blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)))
    assert torch.equal(single, expected.reshape(1, 3, 8))


def test_a_zero_task_vector_claims_no_positions():
    w = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w[0] = 0.0
    got = cabs_sparsify({"w": w}, n=2, m=4)["w"]
    assert torch.equal(got[1], cabs_sparsify({"w": w[1:]}, n=2, m=4)["w"][0])  # task 1 as if it were alone
    assert not bool(got[0].any())


def test_bad_hyperparameters_name_the_key():
    tv = pool()
    with pytest.raises(HyperparameterError, match="density"):
        cabs_sparsify(tv, density=0.0)
    with pytest.raises(HyperparameterError, match="density"):
        cabs_sparsify(tv, density=1.5)
    with pytest.raises(HyperparameterError, match="whole number"):
        cabs_sparsify(tv, density=0.1, m=32)
    with pytest.raises(HyperparameterError, match="1 <= n <= m"):
        cabs_sparsify(tv, n=5, m=4)
    with pytest.raises(HyperparameterError, match="exactly one"):
        cabs_sparsify(tv, density=0.5, n=2, m=4)
    with pytest.raises(HyperparameterError, match="block length"):
        cabs_sparsify(tv, n=1, m=0)
    with pytest.raises(HyperparameterError, match="permutation"):
        cabs_sparsify(tv, n=1, m=4, order=[0, 0, 1])


def test_preprocess_cabs_feeds_adamerging(tiny_pool, tmp_path):
    from hydra.utils import instantiate

    from fusion.methods.base import RunContext
    from tests.test_composition import compose_method

    method = instantiate(compose_method("method=adamerging_layer_wise", "method/preprocess=cabs",
                                        "method.preprocess.density=0.25", "method.preprocess.m=4"))
    model = method.build_model(tiny_pool, 0.3, RunContext(output_dir=tmp_path))
    expected = cabs_sparsify(tiny_pool.task_vectors(), density=0.25, m=4)
    for name, t in model.task_vectors().items():
        assert torch.equal(t, expected[name]), name
    assert all(int(((t != 0).sum(0) > 1).sum()) == 0 for t in expected.values())  # disjoint on real tensors too
