"""Issue-6 wiring: every static baseline runs through the app, and composition by config equals the functions
called by hand (one mechanism: init / preprocess / postprocess groups)."""
from __future__ import annotations


import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fusion.merge.lines import lines_scale
from fusion.merge.sparsify import dare_drop
from fusion.merge.ties import ties
from fusion.methods.base import RunContext
from fusion.methods.learned import initial_value
from tests.test_app import CONF, run_app


def compose_method(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides)).method


@pytest.mark.parametrize("method", ["dare", "della", "consensus", "lines", "iso_c", "iso_cts", "pcb",
                                    "fisher_merging", "regmean", "opcm"])
def test_static_baselines_run_end_to_end(tiny_dirs, tmp_path, method):
    extra = ["++method.tune=null"] if method not in {"fisher_merging", "regmean", "opcm"} else []
    if method in {"fisher_merging", "regmean"}:
        extra += ["method.num_samples=16", "method.batch_size=8"]
    res = run_app(tiny_dirs, tmp_path, method, *extra)
    assert set(res["per_task"]) == {"alpha", "beta", "gamma"}
    assert 0 <= res["mean_accuracy"] <= 1
    if method == "opcm":
        orders = res["method_info"]["orders"]
        assert len(orders) == 3 and res["method_info"]["std_over_orders"] >= 0
    if method in {"fisher_merging", "regmean"}:
        assert res["method_info"]["num_samples_per_task"] == 16 and "16 unlabeled train inputs" in res["protocol"]


def test_postprocess_composition_equals_functions_by_hand(tiny_pool, tiny_taskpool, tmp_path):
    cfg = compose_method("method=ties", "method/postprocess=lines", "++method.tune=null", "method.fn.lam=0.7",
                         "method.postprocess.beta=0.25")
    method = instantiate(cfg)
    out = method.run(tiny_pool, tiny_taskpool, RunContext(output_dir=tmp_path))
    tv = tiny_pool.task_vectors()
    delta = lines_scale(ties(tv, k=0.2, lam=0.7), alpha=1.0, beta=0.25)
    expected = {k: v + delta[k] for k, v in tiny_pool.pretrained_state().items()}
    got = out.encoder.state_dict()
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
    assert out.info["hyperparameters"]["postprocess.beta"] == 0.25


def test_preprocess_and_init_composition(tiny_pool, tiny_taskpool, tmp_path):
    cfg = compose_method("method=adamerging_layer_wise", "method/preprocess=dare", "method/init=task_arithmetic",
                         "method.init.tune.lam=[0.1,0.9]")
    method = instantiate(cfg)
    init, tuning = initial_value(method.init, tiny_pool, tiny_taskpool, RunContext(output_dir=tmp_path))
    assert tuning["on"] == "val" and init == tuning["best"]["lam"] and init in (0.1, 0.9)
    model = method.build_model(tiny_pool, init, RunContext(output_dir=tmp_path))
    expected = dare_drop(tiny_pool.task_vectors(), p=0.5, seed=0)
    for name, t in model.task_vectors().items():
        assert torch.equal(t, expected[name])
    assert torch.allclose(model.weighting.coefficients(), torch.full_like(model.weighting.coefficients(), init))
    # the learned model at its initial point is exactly θ0 + init · Σ dare(τ)
    merged = model.merge_and_unload().state_dict()
    theta0 = tiny_pool.pretrained_state()
    for name, t in expected.items():
        assert torch.allclose(merged[name], theta0[name] + init * t.sum(0), atol=1e-6)


def config_names(group: str) -> list[str]:
    from pathlib import Path

    return sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["method", "modelpool", "taskpool", "trainer", "logger"])
def test_every_config_file_composes_and_instantiates_its_method(group):
    names = config_names(group)
    assert names, group
    for name in names:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("config", overrides=[f"{group}={name}"])[group]
        assert cfg is not None, name
        if group == "method":
            assert instantiate(cfg).name == cfg.name, name


LEARNED = ["adamerging_task_wise", "adamerging_layer_wise", "adamerging_pp_task_wise", "adamerging_pp_layer_wise",
           "concrete_task_arithmetic", "concrete_adamerging_task_wise", "concrete_adamerging_layer_wise", "wemoe",
           "sparse_wemoe", "smear"]


@pytest.mark.parametrize("name", LEARNED)
def test_every_learned_method_takes_its_initial_lambda_from_a_static_merge(name):
    assert set(LEARNED) <= set(config_names("method"))
    assert compose_method(f"method={name}").init == 0.3  # METHODS.md default
    method = instantiate(compose_method(f"method={name}", "method/init=task_arithmetic"))
    assert method.init.name == "task_arithmetic" and method.init.tune is not None


def test_a_merge_without_lam_starts_a_learned_merge_at_its_merged_vector(tiny_pool, tiny_taskpool, tmp_path):
    from fusion.merge.tsv import tsv_m
    from fusion.methods.base import MergedStart

    cfg = compose_method("method=adamerging_layer_wise", "method/init=tsv_m", "method.init.tune.alpha=[0.5]")
    method = instantiate(cfg)
    ctx = RunContext(output_dir=tmp_path)
    init, tuning = initial_value(method.init, tiny_pool, tiny_taskpool, ctx)
    assert isinstance(init, MergedStart) and init.source == "tsv_m" and tuning["best"]["alpha"] == 0.5
    model = method.build_model(tiny_pool, init, ctx)
    assert torch.count_nonzero(model.weighting.coefficients()) == 0  # λ from 0 ...
    merged, theta0 = model.merge_and_unload().state_dict(), tiny_pool.pretrained_state()
    delta = tsv_m(tiny_pool.task_vectors(), alpha=0.5)
    for name, d in delta.items():  # ... on top of θ0 + δ_TSV-M: step 0 is exactly the TSV-M merge
        assert torch.allclose(merged[name], theta0[name] + d, atol=1e-6)
    assert any(not torch.allclose(merged[n], theta0[n] + tiny_pool.task_vectors()[n].sum(0) * 0.3) for n in delta)


def test_init_as_merged_vector_and_data_merges_as_inits(tiny_pool, tiny_taskpool, tmp_path):
    from fusion.merge.magmax import magmax
    from fusion.methods.base import MergedStart

    ctx = RunContext(output_dir=tmp_path)
    magmax_init = instantiate(compose_method("method=adamerging_task_wise", "method/init=magmax",
                                             "method.init.tune.lam=[0.5]").init)
    init, _ = initial_value(magmax_init, tiny_pool, tiny_taskpool, ctx)
    expected = magmax(tiny_pool.task_vectors(), lam=0.5)
    assert isinstance(init, MergedStart) and all(torch.allclose(init.delta[n], expected[n]) for n in expected)
    regmean = instantiate(compose_method("method=adamerging_task_wise", "method/init=regmean",
                                         "method.init.num_samples=8", "method.init.batch_size=8").init)
    init, _ = initial_value(regmean, tiny_pool, tiny_taskpool, ctx)
    merged = regmean.run(tiny_pool, tiny_taskpool, ctx).encoder.state_dict()  # seeded: the same merge again
    theta0 = tiny_pool.pretrained_state()
    assert init.source == "regmean" and all(torch.allclose(theta0[n] + d, merged[n], atol=1e-6)
                                            for n, d in init.delta.items())


@pytest.mark.parametrize("method, init, message", [
    ("wemoe", "tsv_m", "router.*cannot start from a merged vector"),
    ("concrete_task_arithmetic", "tsv_m", "keeps λ fixed at method.init, and λ = 0"),
])
def test_a_merged_vector_init_is_refused_where_it_cannot_work(tiny_pool, tiny_taskpool, tmp_path, method, init,
                                                              message):
    from fusion.errors import ConfigError
    from fusion.merge.task_vectors import HyperparameterError

    runner = instantiate(compose_method(f"method={method}", f"method/init={init}", "method.init.tune=null"))
    runner = runner.stages()[0]
    start, _ = initial_value(runner.init, tiny_pool, tiny_taskpool, RunContext(output_dir=tmp_path))
    with pytest.raises((ConfigError, HyperparameterError), match=message):
        runner.build_model(tiny_pool, start, RunContext(output_dir=tmp_path))


def test_a_task_id_method_is_no_init(tiny_pool, tiny_taskpool, tmp_path):
    from fusion.errors import ConfigError
    from fusion.merge.emr import emr
    from fusion.methods.retrieval import TaskRetrieval

    with pytest.raises(ConfigError, match="method.init 'emr' needs the task id at inference"):
        initial_value(TaskRetrieval(emr, name="emr"), tiny_pool, tiny_taskpool, RunContext(output_dir=tmp_path))
