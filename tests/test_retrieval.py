"""Task-id-at-inference methods (TALL-mask compression, EMR-Merging): the compressed form against hand computations
and loop implementations, the storage it reports, per-task tuning, and a run whose task models are rebuilt."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch

from fusion.evaluate import evaluate, normalized_accuracy
from fusion.merge.emr import emr
from fusion.merge.masks import pack_bits
from fusion.merge.retrieval import MaskedTasks, TaskSpecific, tall_mask_compression
from fusion.merge.task_vectors import HyperparameterError, add_delta
from fusion.merge.ties import ties
from fusion.methods.base import RunContext
from fusion.methods.retrieval import TASK_ID, TaskEncoders, TaskRetrieval
from fusion.pools.openclip import copy_with_state

D = torch.float64


def random_tv(k: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(k, 4, 5, generator=g, dtype=D), "b": torch.randn(k, 5, generator=g, dtype=D)}


def test_emr_by_hand():
    tv = {"t": torch.tensor([[2.0, -1.0, 0.5], [1.0, 3.0, -2.0], [-4.0, 1.0, 1.0]], dtype=D)}
    # Σ = [-1, 3, -0.5] -> γ = [-, +, -]; largest agreeing magnitudes 4, 3, 2 -> τ_uni = [-4, 3, -2]
    # masks τ_t ⊙ τ_uni > 0: [0,0,0], [0,1,1], [1,1,0]; λ = 3.5/0 -> 0, 6/(3+2), 6/(4+3)
    c = emr(tv)
    assert torch.equal(c.shared["t"], torch.tensor([-4.0, 3.0, -2.0], dtype=D))
    assert torch.allclose(c.scales, torch.tensor([0.0, 1.2, 6 / 7]))
    expected = [[0.0, 0.0, 0.0], [0.0, 3.6, -2.4], [-24 / 7, 18 / 7, 0.0]]
    for k in range(3):
        assert torch.allclose(c.task_delta(k)["t"], torch.tensor(expected[k], dtype=D), atol=1e-6)


def slow_emr(tv: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """EMR with Python loops over the flattened model (the reference flattens all parameters)."""
    names, k = list(tv), next(iter(tv.values())).shape[0]
    flat = [torch.cat([tv[n][t].flatten() for n in names]).tolist() for t in range(k)]
    uni = []
    for j in range(len(flat[0])):
        col = [flat[t][j] for t in range(k)]
        s = math.copysign(1.0, sum(col)) if sum(col) != 0 else 0.0
        uni.append(s * max([abs(v) for v in col if v * s > 0], default=0.0))
    out = []
    for t in range(k):
        mask = [1.0 if flat[t][j] * uni[j] > 0 else 0.0 for j in range(len(uni))]
        kept = sum(m * abs(u) for m, u in zip(mask, uni))
        lam = sum(abs(v) for v in flat[t]) / kept if kept else 0.0
        vec, out_t, start = [lam * m * u for m, u in zip(mask, uni)], {}, 0
        for n in names:
            size = tv[n][t].numel()
            out_t[n] = torch.tensor(vec[start:start + size], dtype=D).reshape(tv[n][t].shape)
            start += size
        out.append(out_t)
    return out


def test_emr_matches_a_loop_implementation_and_keeps_each_tasks_l1_mass():
    tv = random_tv(k=4, seed=3)
    c, slow = emr(tv), slow_emr(tv)
    assert isinstance(c, TaskSpecific) and c.num_tasks == 4
    for k in range(4):
        got = c.task_delta(k)
        for n in tv:
            assert torch.allclose(got[n], slow[k][n], rtol=1e-6, atol=1e-7)
        mass = sum(float(got[n].abs().sum()) for n in tv)
        assert mass == pytest.approx(sum(float(tv[n][k].abs().sum()) for n in tv), rel=1e-6)
        assert not torch.allclose(got["w"], tv["w"][k])  # a compression, not the expert itself


def test_tall_mask_compression_matches_the_definition_and_counts_its_bytes():
    tv, lambdas = random_tv(k=3, seed=1), [0.2, 0.4, 0.6]
    c = tall_mask_compression(tv, lambdas)
    for k, lam in enumerate(lambdas):
        got = c.task_delta(k)
        for n, t in tv.items():
            mtl = t.sum(0)
            mask = torch.tensor([float(abs(a) >= lam * abs(m - a)) for a, m in zip(t[k].flatten().tolist(),
                                                                                 mtl.flatten().tolist())], dtype=D)
            assert torch.equal(got[n], mask.reshape(mtl.shape) * mtl)
    assert c.kept_fraction()[0] > c.kept_fraction()[2]  # a lower threshold keeps more
    # shared: 25 float64 entries; per task: ceil(20/8) + ceil(5/8) packed bytes for each of 3 tasks + 3 float32 scales
    assert c.stored_bytes() == {"shared": 25 * 8, "per_task": 3 * (3 + 1) + 3 * 4}
    assert torch.equal(c.masks["w"][1], pack_bits(tv["w"][1].abs() >= 0.4 * (tv["w"].sum(0) - tv["w"][1]).abs()))


def test_tall_mask_compression_over_ties_and_bad_input():
    tv = random_tv(k=3, seed=2)
    c = tall_mask_compression(tv, 0.3, base="ties", ties_k=0.5)
    merged = ties(tv, k=0.5, lam=1.0, aggregate="sum")
    assert all(torch.equal(c.shared[n], merged[n]) for n in tv)
    with pytest.raises(HyperparameterError, match="at least 2 task vectors"):
        tall_mask_compression({n: t[:1] for n, t in tv.items()})
    with pytest.raises(HyperparameterError, match="base must be 'ta' or 'ties', got 'mean'"):
        tall_mask_compression(tv, base="mean")
    with pytest.raises(HyperparameterError, match="K=3"):
        tall_mask_compression(tv, lambdas=[0.2, 0.3])
    with pytest.raises(HyperparameterError, match="emr needs at least 2"):
        emr({n: t[:1] for n, t in tv.items()})


@dataclass
class Recorded:
    """A compressed form that only records the λ it was built with (for the selection logic)."""

    lambdas: object
    num_tasks: int = 3

    def task_delta(self, k):
        return {}

    def stored_bytes(self):
        return {"shared": 0, "per_task": 0}


class ScoringContext(RunContext):
    """Task alpha scores best at λ = 0.2, beta at 0.6, gamma at 0.4 (mean best at 0.4)."""

    def evaluate(self, encoder, heads, taskpool, split):
        assert split == "val" and isinstance(encoder, TaskEncoders)
        lam = encoder.compressed.lambdas
        return {"alpha": 1 - abs(lam - 0.2), "beta": 1 - abs(lam - 0.6), "gamma": 1 - abs(lam - 0.4)}


@pytest.mark.parametrize("per_task, chosen", [(True, [0.2, 0.6, 0.4]), (False, 0.4)])
def test_task_retrieval_tunes_each_tasks_value_on_its_own_validation_accuracy(tiny_pool, per_task, chosen, tmp_path):
    method = TaskRetrieval(functools.partial(lambda tv, lambdas: Recorded(lambdas), lambdas=0.3), name="t",
                           per_task=per_task, tune={"lambdas": [0.2, 0.4, 0.6]})
    hparams, record = method.select(tiny_pool, None, tiny_pool.task_vectors(), ScoringContext(output_dir=tmp_path))
    assert hparams["lambdas"] == chosen and record["chosen"] == {"lambdas": chosen} and len(record["scores"]) == 3


def test_task_models_are_rebuilt_and_evaluated_per_task(tiny_pool, tiny_taskpool, tmp_path):
    method = TaskRetrieval(emr, name="emr")
    outcome = method.run(tiny_pool, tiny_taskpool, RunContext(output_dir=tmp_path))
    assert outcome.inference == TASK_ID and outcome.info["inference"] == TASK_ID
    tv = tiny_pool.task_vectors()
    storage = outcome.info["storage"]
    assert storage["task_vectors_bytes"] == sum(t.numel() * t.element_size() for t in tv.values())
    assert 0 < storage["fraction_of_task_vectors"] < 0.5  # one vector + K bit masks instead of K vectors (K = 3)
    assert storage["fraction_of_experts"] == pytest.approx(storage["fraction_of_task_vectors"] + 1 / 3)  # + θ_0
    got = evaluate(outcome.encoder, tiny_pool.heads, tiny_taskpool, split="test")
    compressed = emr(tv)
    for k, task in enumerate(tiny_pool.tasks):  # the independent rebuild: θ_0 + λ_k M_k ⊙ τ_uni, one task at a time
        model = copy_with_state(tiny_pool.encoder, add_delta(tiny_pool.pretrained_state(), compressed.task_delta(k)))
        assert got[task] == evaluate(model, tiny_pool.heads, tiny_taskpool, split="test", tasks=[task])[task]
    experts = evaluate({t: tiny_pool.expert_encoder(t) for t in tiny_pool.tasks}, tiny_pool.heads, tiny_taskpool)
    assert normalized_accuracy(got, experts) == pytest.approx(sum(got[t] / experts[t] for t in got) / len(got))


def test_tune_keys_must_be_arguments_of_fn():
    from fusion.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tune keys \['lambda'\] are not arguments set on fn \(\['base', 'lambdas'\]\)"):
        TaskRetrieval(functools.partial(tall_mask_compression, lambdas=0.4, base="ta"), tune={"lambda": [0.2]})
    with pytest.raises(ConfigError, match="would tune on test labels"):
        TaskRetrieval(emr, tune_split="test")


def test_tsv_c_honours_the_task_specific_contract():
    from fusion.merge.tsv import tsv_low_rank, tsv_storage_bytes, tsv_task_delta

    tv = random_tv(k=2, seed=4)  # w: [2, 4, 5] -> rank 4, fraction 1/2 keeps 2 directions; b: kept dense
    c = tsv_low_rank(tv)
    assert isinstance(c, TaskSpecific) and c.num_tasks == 2
    assert c.stored_bytes() == {"shared": 0, "per_task": tsv_storage_bytes(c)} == {"shared": 0, "per_task":
                                                                                   2 * (4 * 2 + 2 + 2 * 5 + 5) * 8}
    assert all(torch.equal(c.task_delta(1)[n], tsv_task_delta(c, 1)[n]) for n in tv)
    assert int(torch.linalg.matrix_rank(c.task_delta(1)["w"])) == 2


def test_masked_tasks_scales_default_to_one():
    tv = random_tv(k=2)
    c = MaskedTasks.from_masks({n: t.sum(0) for n, t in tv.items()}, {n: t > 0 for n, t in tv.items()})
    assert torch.equal(c.scales, torch.ones(2))
    assert torch.equal(c.task_delta(1)["b"], (tv["b"][1] > 0) * tv["b"].sum(0))
