"""FW-Merging (fusion.merge.frank_wolfe, fusion.methods.frank_wolfe) and pools padded with distractor experts."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusion.data.taskpool import ImageTensorDataset
from fusion.errors import ConfigError
from fusion.merge.combine import task_arithmetic
from fusion.merge.frank_wolfe import alignment_scores, candidate_weights, frank_wolfe, fw_gamma, fw_step, lmo_select
from fusion.merge.task_vectors import HyperparameterError
from fusion.methods.base import RunContext
from fusion.methods.frank_wolfe import FrankWolfeMerge, objective_gradient
from fusion.pools.heads import ZeroShotHeads
from fusion.pools.pool import ModelPool

D = torch.float64
GRAD = {"a": torch.tensor([1.0, 0.0], dtype=D), "b": torch.tensor([0.0, 1.0], dtype=D)}
CANDS = {"a": torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]], dtype=D),
         "b": torch.tensor([[0.0, -3.0], [0.0, 1.0], [5.0, 5.0]], dtype=D)}


# ----------------------------------------------------------------------------------------------- the oracle
def test_lmo_picks_the_most_negative_alignment_per_layer_and_model_wise() -> None:
    # inner products: a -> [1, -1, 0], b -> [-3, 1, 5]; model sums [-2, 0, 5]
    assert lmo_select(GRAD, CANDS, "layer", "inner") == {"a": 1, "b": 0}
    assert lmo_select(GRAD, CANDS, "model", "inner") == {"a": 0, "b": 0}
    cos = alignment_scores(GRAD, CANDS, "cosine")
    assert torch.allclose(cos["b"], torch.tensor([-1.0, 1.0, 5 / math.sqrt(50)], dtype=D))
    # cosine model sums: [1 - 1, -1 + 1, 0 + 0.707] = [0, 0, 0.707]: the tie goes to the first
    assert lmo_select(GRAD, CANDS, "model", "cosine") == {"a": 0, "b": 0}
    assert lmo_select(GRAD, CANDS, "layer", "cosine") == {"a": 1, "b": 0}


def test_cosine_of_a_zero_candidate_is_zero_not_nan() -> None:
    scores = alignment_scores(GRAD, {"a": torch.zeros(2, 2, dtype=D), "b": CANDS["b"][:2]}, "cosine")
    assert torch.equal(scores["a"], torch.zeros(2, dtype=D))


# ----------------------------------------------------------------------------------------------- the step
def test_fw_step_is_the_convex_step_and_skips_tensors_without_descent() -> None:
    delta = {"a": torch.tensor([1.0, 1.0], dtype=D), "b": torch.tensor([1.0, 1.0], dtype=D)}
    choice = {"a": 1, "b": 0}
    out, gap, moved = fw_step(delta, GRAD, CANDS, choice, 0.5, "layer")
    # a: gap <g, δ - s> = <(1,0), (2,1)> = 2 > 0 -> 0.5·(1,1) + 0.5·(-1,0); b: <(0,1), (1,4)> = 4 > 0
    assert torch.equal(out["a"], torch.tensor([0.0, 0.5], dtype=D))
    assert torch.equal(out["b"], torch.tensor([0.5, -1.0], dtype=D))
    assert gap == 6.0 and moved == {"a": True, "b": True}
    out, _, moved = fw_step(delta, GRAD, CANDS, {"a": 0, "b": 1}, 0.5, "layer")  # a: gap 0, b: gap 0: no descent
    assert moved == {"a": False, "b": False} and torch.equal(out["a"], delta["a"])
    out, gap, moved = fw_step(delta, GRAD, CANDS, {"a": 0, "b": 0}, 0.5, "model")  # total gap 0 + 4 > 0: all move
    assert moved == {"a": True, "b": True} and torch.equal(out["a"], torch.tensor([1.0, 0.5], dtype=D))


def test_schedule_is_two_over_t_plus_two_times_step_size_capped_at_one() -> None:
    assert [fw_gamma(t, 1.0) for t in range(3)] == [1.0, 2 / 3, 0.5]
    assert fw_gamma(0, 0.03) == pytest.approx(0.03) and fw_gamma(2, 3.0) == 1.0


def _quadratic(target):
    """``δ -> ∇ ½‖δ − target‖²``."""
    return lambda delta: {n: delta[n] - target[n] for n in target}


@pytest.mark.parametrize("granularity", ["layer", "model"])
@pytest.mark.parametrize("step_size", [1.0, 0.3])
def test_iterates_stay_in_the_convex_hull_with_the_recorded_weights(granularity, step_size) -> None:
    gen = torch.Generator().manual_seed(0)
    cands = {"w": torch.randn(4, 3, 2, generator=gen, dtype=D), "v": torch.randn(4, 5, generator=gen, dtype=D)}
    target = {n: torch.randn(c.shape[1:], generator=gen, dtype=D) for n, c in cands.items()}
    init = {n: torch.randn(c.shape[1:], generator=gen, dtype=D) for n, c in cands.items()}
    delta, history = frank_wolfe(cands, _quadratic(target), 6, step_size, granularity, "inner", init)
    w = candidate_weights(history, list(cands), 4)
    assert (w >= 0).all() and torch.allclose(w.sum(0), torch.ones(2, dtype=D))
    for l, (n, c) in enumerate(cands.items()):  # δ^l = w_init·δ0^l + Σ_m w_m c_m^l, by an explicit sum
        rebuilt = w[4, l] * init[n] + sum(w[m, l] * c[m] for m in range(4))
        assert torch.allclose(delta[n], rebuilt)
    if step_size == 1.0:  # γ_0 = 1: the start is forgotten after the first step
        assert torch.equal(w[4], torch.zeros(2, dtype=D))
    if granularity == "model":
        assert all(len(set(h["choice"].values())) == 1 for h in history)


def test_bfloat16_candidates_are_scored_and_accumulated_in_float32() -> None:
    gen = torch.Generator().manual_seed(4)
    cands = {"w": torch.randn(3, 4, 4, generator=gen, dtype=D)}
    target = {"w": torch.randn(4, 4, generator=gen, dtype=D)}
    low = {"w": cands["w"].to(torch.bfloat16)}
    delta, history = frank_wolfe(low, _quadratic(target), 4)
    assert delta["w"].dtype == torch.float32
    ref, ref_history = frank_wolfe({"w": low["w"].double()}, _quadratic(target), 4)
    assert [h["choice"] for h in history] == [h["choice"] for h in ref_history]
    assert torch.allclose(delta["w"].double(), ref["w"], atol=1e-6)


def test_fw_finds_the_true_direction_among_noise_where_task_arithmetic_cannot() -> None:
    gen = torch.Generator().manual_seed(1)
    shapes = {"w": (6, 4), "b": (6,)}
    true = {n: torch.randn(s, generator=gen, dtype=D) for n, s in shapes.items()}
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in true.values()))
    noise = [{n: torch.randn(s, generator=gen, dtype=D) for n, s in shapes.items()} for _ in range(5)]
    noise = [{n: t * norm / math.sqrt(sum(float(u.pow(2).sum()) for u in z.values())) for n, t in z.items()}
             for z in noise]  # distractors as large as the useful vector
    cands = {n: torch.stack([true[n]] + [z[n] for z in noise]) for n in shapes}

    def loss(delta):
        return 0.5 * sum(float((delta[n] - true[n]).pow(2).sum()) for n in shapes)

    for granularity in ("layer", "model"):
        delta, history = frank_wolfe(cands, _quadratic(true), 10, 1.0, granularity)
        assert set(history[0]["choice"].values()) == {0}
        assert loss(delta) < 1e-20
    ta_best = min(loss(task_arithmetic(cands, lam)) for lam in torch.linspace(0.0, 1.0, 101).tolist())
    assert ta_best > 0.5 * loss({n: torch.zeros(s, dtype=D) for n, s in shapes.items()})  # TA keeps > half the loss


@pytest.mark.parametrize("kwargs, key", [({"iterations": 0}, "iterations"), ({"step_size": 0.0}, "step_size"),
                                         ({"step_size": -1.0}, "step_size"), ({"granularity": "block"}, "granularity"),
                                         ({"alignment": "angle"}, "alignment")])
def test_bad_hyperparameters_give_one_message(kwargs, key) -> None:
    with pytest.raises(HyperparameterError, match=key):
        frank_wolfe(CANDS, _quadratic({n: c[0] for n, c in CANDS.items()}), **kwargs)
    with pytest.raises(HyperparameterError, match=key):
        FrankWolfeMerge(**kwargs)


def test_method_refuses_test_labels_and_bad_scales() -> None:
    with pytest.raises(ConfigError, match="test labels"):
        FrankWolfeMerge(split="test")
    with pytest.raises(ConfigError, match="scale"):
        FrankWolfeMerge(scale=0.0)
    with pytest.raises(ConfigError, match="tune"):
        FrankWolfeMerge(tune={"lam": [0.1]})


# ----------------------------------------------------------------------------------------------- a tiny pool
def tiny_model_pool(distractors: int = 0) -> ModelPool:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.GELU(), nn.Linear(8, 5)).double()
    gen = torch.Generator().manual_seed(1)

    def perturbed(scale):
        return {n: p.detach() + scale * torch.randn(p.shape, generator=gen, dtype=D)
                for n, p in encoder.state_dict().items()}

    heads = ZeroShotHeads({t: torch.randn(4, 5, generator=gen, dtype=D) for t in ("t0", "t1")}, 10.0)
    return ModelPool("tiny", encoder, {t: perturbed(0.3) for t in ("t0", "t1")}, heads,
                     distractors={f"noise{i}": perturbed(0.3) for i in range(distractors)})


class TinyTasks:
    """Two tasks of float64 ``[N, 2, 1, 6]`` inputs and 4 classes, one split for all."""

    tasks = ["t0", "t1"]

    def __init__(self):
        gen = torch.Generator().manual_seed(2)
        self.data = {t: (torch.randn(20, 2, 1, 6, generator=gen, dtype=D).float(), torch.arange(20) % 4)
                     for t in self.tasks}

    def dataset(self, task, split):
        return ImageTensorDataset(*self.data[task], name=task)


def test_distractors_are_appended_after_the_task_experts_and_tasks_stay() -> None:
    pool, plain = tiny_model_pool(distractors=2), tiny_model_pool()
    assert pool.tasks == ["t0", "t1"] and pool.candidates == ["t0", "t1", "noise0", "noise1"]
    tv, tv0 = pool.task_vectors(), plain.task_vectors()
    theta0 = pool.pretrained_state()
    for n, t in tv.items():
        assert t.shape[0] == 4 and torch.equal(t[:2], tv0[n])
        assert torch.equal(t[3], pool.distractors["noise1"][n] - theta0[n])
    assert pool.select(["t1"]).candidates == ["t1", "noise0", "noise1"]
    assert pool.content_key() != plain.content_key()
    with pytest.raises(ValueError, match="rename"):
        ModelPool("x", plain.encoder, plain.experts, plain.heads, distractors={"t0": plain.experts["t0"]})


def test_methods_that_pair_experts_with_tasks_refuse_distractors(tmp_path) -> None:
    from fusion.methods.continual import OPCMMerge
    from fusion.methods.data_merges import FisherMerge, RegMeanMerge
    from fusion.methods.learned import LearnedMerge
    from fusion.train.objectives import Entropy

    pool, ctx = tiny_model_pool(distractors=1), RunContext(output_dir=tmp_path)
    learned = LearnedMerge("adamerging", model=None, objective=Entropy(), optimizer=None, data=None, steps=1)
    for method in (FisherMerge(), RegMeanMerge(), OPCMMerge(), learned):
        with pytest.raises(ConfigError, match=r"distractors \['noise0'\] with no task"):
            method.run(pool, TinyTasks(), ctx)


def test_objective_gradient_matches_autograd_on_a_loaded_model() -> None:
    pool, tasks = tiny_model_pool(distractors=1), TinyTasks()
    batches = {t: [tasks.dataset(t, "val").batch(torch.arange(i, i + 10)) for i in (0, 10)] for t in tasks.tasks}
    batches = {t: [(x.double(), y) for x, y in bs] for t, bs in batches.items()}
    from fusion.train.objectives import CrossEntropy

    theta0 = pool.pretrained_state()
    delta = {n: 0.1 * t.sum(0) for n, t in pool.task_vectors().items()}
    got = objective_gradient(pool.encoder, pool.heads, theta0, batches, CrossEntropy())(delta)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.GELU(), nn.Linear(8, 5)).double()
    model.load_state_dict({n: theta0[n] + delta[n] for n in theta0})
    loss = sum(F.cross_entropy(pool.heads(model(x), t), y, reduction="sum") / 20 / 2
               for t, bs in batches.items() for x, y in bs)
    loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-12), n


def test_fw_merging_runs_on_a_padded_pool_and_records_its_choices(tmp_path) -> None:
    pool, tasks = _float_pool(distractors=2), TinyTasks()
    method = FrankWolfeMerge(iterations=3, num_samples=20, batch_size=10, granularity="model", init_lam=0.1)
    out = method.run(pool, tasks, RunContext(output_dir=tmp_path))
    assert out.info["candidates"] == ["t0", "t1", "noise0", "noise1"]
    weights = out.info["mean_weight"]
    assert set(weights) == {"t0", "t1", "noise0", "noise1", "initial"}
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-3)
    assert [round(h["gamma"], 4) for h in out.info["iterations"]] == [1.0, 0.6667, 0.5]
    merged = out.encoder.state_dict()
    ta = {n: v + 0.1 * t.sum(0) for (n, v), t in zip(pool.pretrained_state().items(), pool.task_vectors().values())}
    assert any(not torch.allclose(merged[n], ta[n]) for n in ta)  # it moved away from its TA start
    assert "FW-Merging" in out.protocol and "4 candidate task vectors" in out.protocol


def _float_pool(distractors: int = 0) -> ModelPool:
    pool = tiny_model_pool(distractors)
    pool.encoder.float(), pool.heads.float()
    pool.experts = {t: {n: v.float() for n, v in s.items()} for t, s in pool.experts.items()}
    pool.distractors = {t: {n: v.float() for n, v in s.items()} for t, s in pool.distractors.items()}
    return pool


@pytest.mark.parametrize("init_lam, step_size", [(0.0, 1.0), (0.2, 1.0), (0.0, 0.5), (0.2, 0.5)])
def test_as_an_init_it_gives_the_task_coefficients_of_its_merge(tmp_path, init_lam, step_size) -> None:
    from fusion.merge.combine import combine

    pool, ctx = _float_pool(), RunContext(output_dir=tmp_path)
    method = FrankWolfeMerge(iterations=4, num_samples=20, batch_size=10, scale=1.5, init_lam=init_lam,
                             step_size=step_size)
    lam, record = method.initial_coefficient(pool, TinyTasks(), ctx)
    assert len(lam) == 2 and record["fw_merging"]["scale"] == 1.5
    merged = method.run(pool, TinyTasks(), ctx).encoder.state_dict()
    rebuilt = combine(pool.task_vectors(), torch.tensor(lam))
    theta0 = pool.pretrained_state()
    for n, d in rebuilt.items():
        assert torch.allclose(merged[n], theta0[n] + d, atol=1e-6), n
    with pytest.raises(ConfigError, match="granularity=model"):
        FrankWolfeMerge(granularity="layer").initial_coefficient(pool, TinyTasks(), ctx)


def test_init_config_composes_under_a_learned_method() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["method=adamerging_task_wise", "method/init=fw_merging"])
    method = instantiate(cfg.method)
    assert isinstance(method.init, FrankWolfeMerge) and method.init.objective.name == "cross_entropy"
    assert method.objective.name == "entropy"  # the learned method keeps its own objective


# ----------------------------------------------------------------------------------------------- the builder
def test_shuffled_label_distractors_are_built_cached_and_loaded(tiny_dirs, tiny_taskpool, tmp_path) -> None:
    from fusion.pools.distractors import ShuffledLabels, build_distractors, distractor_key
    from fusion.pools.pool import load_pool
    from tests.conftest import TINY_RECIPE

    shuffled = ShuffledLabels(tiny_taskpool, "beta", seed=3).dataset("beta", "train")
    original = tiny_taskpool.dataset("beta", "train")
    assert torch.equal(shuffled.images, original.images)
    assert sorted(shuffled.labels.tolist()) == sorted(original.labels.tolist())
    assert not torch.equal(shuffled.labels, original.labels)
    assert torch.equal(ShuffledLabels(tiny_taskpool, "beta", 3).dataset("alpha", "train").labels,
                       tiny_taskpool.dataset("alpha", "train").labels)

    pool = load_pool(tiny_dirs[0])
    finetune = {**TINY_RECIPE["finetune"], "steps": {"alpha": 3, "beta": 3, "gamma": 3}}
    out = build_distractors(tmp_path / "d", pool, tiny_taskpool, finetune, count=2, seed=0, accelerator="cpu")
    padded = load_pool(tiny_dirs[0], distractors=out)
    assert padded.tasks == pool.tasks
    assert padded.candidates == pool.tasks + ["shuffled-alpha-0", "shuffled-beta-1"]
    tv = padded.task_vectors()
    assert all(t.shape[0] == len(pool.tasks) + 2 for t in tv.values())
    assert sum(float(t[-1].abs().sum()) for t in tv.values()) > 0  # the distractor moved off θ0
    assert distractor_key("h", 2, 0) != distractor_key("h", 3, 0) != distractor_key("h", 2, 1)
    with pytest.raises(ConfigError, match="count"):
        build_distractors(tmp_path / "e", pool, tiny_taskpool, finetune, count=0, seed=0)


def test_padded_benchmark_runs_on_a_tiny_pool(tiny_dirs, tiny_taskpool, tmp_path) -> None:
    import json

    from benchmarks.fw_padded import main
    from fusion.pools.distractors import build_distractors
    from fusion.pools.pool import load_pool
    from tests.conftest import TINY_RECIPE

    finetune = {**TINY_RECIPE["finetune"], "steps": {"alpha": 2, "beta": 2, "gamma": 2}}
    distractors = build_distractors(tmp_path / "d", load_pool(tiny_dirs[0]), tiny_taskpool, finetune, count=1, seed=0,
                                    accelerator="cpu")
    base = ["modelpool=dir", f"modelpool.directory={tiny_dirs[0]}", "taskpool=dir", f"taskpool.directory={tiny_dirs[1]}"]
    out = tmp_path / "fw.json"
    assert main(["--pool", "tiny", *base, "--pool", "padded", *base, f"+modelpool.distractors={distractors}",
                 "--override", "method.tune=null", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["pools"]) == ["tiny", "padded"]
    padded = result["pools"]["padded"]
    assert padded["candidates"] == padded["tasks"] + ["shuffled-alpha-0"]
    for pool in result["pools"].values():
        assert set(pool["methods"]) == {"task_arithmetic", "fw_merging"}
        assert all(0 <= m["test"]["mean_accuracy"] <= 1 for m in pool["methods"].values())
    weights = padded["methods"]["fw_merging"]["info"]["mean_weight"]
    assert list(weights) == padded["candidates"] + ["pretrained"]
    assert sum(weights.values()) == pytest.approx(1.0)


def test_padded_mini8_distractors_are_cached_by_their_hash(tiny_dirs, tiny_taskpool, monkeypatch) -> None:
    import fusion.pools.distractors as distractors
    from fusion.errors import MissingFileError
    from fusion.pools.mini8 import padded_dir
    from tests.conftest import TINY_RECIPE

    recipe = {**TINY_RECIPE, "finetune": {**TINY_RECIPE["finetune"], "steps": {"alpha": 2, "beta": 2, "gamma": 2}}}
    first = padded_dir(tiny_dirs[0], {"count": 1, "seed": 5}, tiny_taskpool, recipe, build_if_missing=True)
    assert first.parent == tiny_dirs[0].parent and (first / "manifest.json").is_file()
    monkeypatch.setattr(distractors, "build_distractors", lambda *a, **k: pytest.fail("rebuilt a cached set"))
    assert padded_dir(tiny_dirs[0], {"count": 1, "seed": 5}, tiny_taskpool, recipe, build_if_missing=True) == first
    with pytest.raises(MissingFileError, match="build_if_missing"):
        padded_dir(tiny_dirs[0], {"count": 1, "seed": 6}, tiny_taskpool, recipe, build_if_missing=False)
