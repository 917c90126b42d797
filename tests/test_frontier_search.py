"""Evolutionary coefficient search (MERGE^3 spirit): the CMA-ES core on known fitness functions, the subset
fitness against an independent computation, the method on the tiny pool, and its use as a learned method's init."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from fusion.errors import ConfigError
from fusion.evaluate import evaluate, random_subset, task_accuracy
from fusion.methods.base import RunContext
from fusion.methods.learned import initial_value
from fusion.methods.search import EvolutionarySearch, cma_search, subset_fitness
from tests.test_composition import compose_method


class Counted:
    """A fitness that records every point it is called with."""

    def __init__(self, fn):
        self.fn, self.points = fn, []

    def __call__(self, x):
        self.points.append(np.array(x))
        return self.fn(x)


def test_quadratic_optimum_inside_bounds_is_found_within_the_exact_budget():
    opt = np.array([0.2, 0.7, 0.5, 0.35])
    fit = Counted(lambda x: -float(np.sum((x - opt) ** 2)))
    res = cma_search(fit, np.full(4, 0.3), evaluations=300, sigma0=0.2, seed=0)
    assert len(fit.points) == res.evaluations == 300
    assert np.abs(res.best - opt).max() < 0.03
    assert res.best_fitness == pytest.approx(fit.fn(res.best)) and res.best_fitness == max(res.history)
    assert all(((p >= 0) & (p <= 1)).all() for p in fit.points)


def test_partial_last_generation_is_evaluated_not_told_and_bounds_hold_at_a_corner():
    fit = Counted(lambda x: float(np.sum(x)))  # optimum at the upper corner of the box
    res = cma_search(fit, np.full(3, 0.2), evaluations=10, popsize=4, sigma0=0.3, bounds=(0.1, 0.4), seed=3)
    assert len(fit.points) == 10 and res.generations == 2  # 4 + 4 told, 2 evaluated
    assert all(((p >= 0.1) & (p <= 0.4)).all() for p in fit.points)
    assert ((res.final_mean >= 0.1) & (res.final_mean <= 0.4)).all()
    many = cma_search(lambda x: float(np.sum(x)), np.full(3, 0.2), evaluations=200, sigma0=0.3, bounds=(0.1, 0.4))
    assert np.allclose(many.best, 0.4, atol=0.01)


def test_deterministic_under_a_seed():
    fn = lambda x: -float(np.sum((x - 0.6) ** 2))  # noqa: E731
    a = cma_search(fn, np.zeros(3), evaluations=30, seed=5)
    b = cma_search(fn, np.zeros(3), evaluations=30, seed=5)
    c = cma_search(fn, np.zeros(3), evaluations=30, seed=6)
    assert a.history == b.history and np.array_equal(a.best, b.best)
    assert a.history != c.history


@pytest.mark.parametrize("kwargs,match", [
    ({"evaluations": 0}, "evaluations"),
    ({"evaluations": 5, "popsize": 6}, "popsize"),
    ({"evaluations": 10, "bounds": (1.0, 0.0)}, "bounds"),
    ({"evaluations": 10, "sigma0": 0.0}, "sigma0"),
])
def test_bad_search_settings_raise_one_clear_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cma_search(lambda x: 0.0, np.zeros(3), **kwargs)


def test_one_coefficient_is_too_small_a_pool():
    with pytest.raises(ConfigError, match="one task"):
        cma_search(lambda x: 0.0, np.zeros(1), evaluations=10)
    with pytest.raises(ConfigError, match="subset_size"):
        EvolutionarySearch("e", subset_size=0)
    with pytest.raises(ConfigError, match="test labels"):
        EvolutionarySearch("e", split="test")


def test_random_subset_and_evaluate_subset_option(tiny_pool, tiny_taskpool):
    data = tiny_taskpool.dataset("alpha", "val")
    sub = random_subset(data, 10, seed=4)
    assert len(sub) == 10 and len(set(sub.indices.tolist())) == 10
    drawn = torch.randperm(len(data), generator=torch.Generator().manual_seed(4))[:10]
    assert torch.equal(sub.indices, drawn.sort().values)
    assert len(random_subset(data, 10_000)) == len(data)
    x, y = sub.batch(torch.arange(10))
    x0, y0 = data.batch(sub.indices)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    got = evaluate(tiny_pool.encoder, tiny_pool.heads, tiny_taskpool, split="val", subset=10, subset_seed=4)
    assert got["alpha"] == task_accuracy(tiny_pool.encoder, tiny_pool.heads, sub, "alpha")


def test_subset_fitness_equals_an_independent_accuracy(tiny_pool, tiny_taskpool, tmp_path):
    pool_tv = tiny_pool.task_vectors()
    subsets = {t: random_subset(tiny_taskpool.dataset(t, "val"), 12, seed=1) for t in tiny_pool.tasks}
    lam = np.array([0.9, 0.1, 0.5])
    fitness = subset_fitness(tiny_pool, pool_tv, subsets, (3,), RunContext(output_dir=tmp_path))
    # by hand: θ0 + Σ_k λ_k τ_k loaded into a copy, logits argmax on the same 12 images per task
    import copy

    theta0 = tiny_pool.pretrained_state()
    state = {k: v + sum(float(lam[i]) * pool_tv[k][i] for i in range(3)) if k in pool_tv else v
             for k, v in theta0.items()}
    enc = copy.deepcopy(tiny_pool.encoder)
    enc.load_state_dict(state)
    enc.eval()
    accs = []
    with torch.no_grad():
        for task in tiny_pool.tasks:
            data = tiny_taskpool.dataset(task, "val")
            idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))[:12]
            x, y = data.batch(idx)
            accs.append(float((tiny_pool.heads(enc(x), task).argmax(-1) == y).float().mean()))
    assert fitness(lam) == pytest.approx(sum(accs) / 3, abs=1e-6)


def test_method_reports_budget_and_estimate_error(tiny_pool, tiny_taskpool, tmp_path):
    method = EvolutionarySearch("evolutionary_task_wise", evaluations=7, popsize=3, subset_size=8, sigma0=0.3)
    out = method.run(tiny_pool, tiny_taskpool, RunContext(output_dir=tmp_path))
    rec = out.info["search"]
    assert rec["evaluations"] == 7 and rec["generations"] == 2 and rec["dimension"] == 3
    assert len(rec["fitness_history"]) == 7 and rec["best_fitness"] == pytest.approx(max(rec["fitness_history"]))
    assert [e["candidate"] for e in rec["estimate"]] == ["best", "final_mean", "init"]
    for e in rec["estimate"]:
        assert e["abs_error"] == pytest.approx(abs(e["subset"] - e["full"]))
    assert rec["best_abs_error"] == rec["estimate"][0]["abs_error"]
    assert all(0.0 <= v <= 1.0 for v in out.info["lambdas"]) and len(out.info["lambdas"]) == 3
    # the returned encoder is θ0 + Σ λ τ with the reported λ
    tv, theta0 = tiny_pool.task_vectors(), tiny_pool.pretrained_state()
    lam = torch.tensor(out.info["lambdas"])
    got = out.encoder.state_dict()
    for k, t in tv.items():
        assert torch.allclose(got[k], theta0[k] + torch.tensordot(lam, t, dims=1), atol=1e-6), k


def test_layer_wise_search_initialises_layer_wise_adamerging(tiny_pool, tiny_taskpool, tmp_path):
    cfg = compose_method("method=adamerging_layer_wise", "method/init=evolutionary_layer_wise",
                         "method.init.evaluations=4", "method.init.popsize=2", "method.init.subset_size=4")
    method = instantiate(cfg)
    ctx = RunContext(output_dir=tmp_path)
    init, record = initial_value(method.init, tiny_pool, tiny_taskpool, ctx)
    tv = tiny_pool.task_vectors()
    assert np.array(init).shape == (3, len(tv)) and record["evaluations"] == 4
    model = method.build_model(tiny_pool, init, ctx)
    assert torch.allclose(model.weighting.coefficients(), torch.tensor(init, dtype=torch.float32))
    # a layer-wise table cannot start a task-wise model
    task_wise = instantiate(compose_method("method=adamerging_task_wise"))
    with pytest.raises(Exception, match="layer-wise"):
        task_wise.build_model(tiny_pool, init, ctx)


def test_task_wise_search_initialises_task_wise_adamerging(tiny_pool, tiny_taskpool, tmp_path):
    cfg = compose_method("method=adamerging_task_wise", "method/init=evolutionary_task_wise",
                         "method.init.evaluations=4", "method.init.popsize=2", "method.init.subset_size=4")
    method = instantiate(cfg)
    ctx = RunContext(output_dir=tmp_path)
    init, _ = initial_value(method.init, tiny_pool, tiny_taskpool, ctx)
    model = method.build_model(tiny_pool, init, ctx)
    assert len(init) == 3 and torch.allclose(model.weighting.coefficients(), torch.tensor(init))


def test_initial_values_take_a_layer_wise_table():
    from fusion.merge.task_vectors import HyperparameterError
    from fusion.param.coefficients import initial_values

    table = [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]
    assert torch.equal(initial_values(table, 3, 2), torch.tensor(table))
    assert torch.equal(initial_values([0.1, 0.2, 0.3], 3, 2), torch.tensor([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]]))
    with pytest.raises(HyperparameterError, match=r"\[K=3, L=4\]"):
        initial_values(table, 3, 4)
    with pytest.raises(HyperparameterError, match="layer_wise: true"):
        initial_values(table, 3)
