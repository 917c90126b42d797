"""The contract every merge parametrization honours (STYLE.md habits 4 and 10), run over EVERY learned config.

Each ``conf/method/*.yaml`` is composed and instantiated as the ``fusion`` CLI does it (Hydra compose + instantiate);
those that train (:class:`fusion.methods.learned.LearnedMethod`) give their training stages, and each stage builds
its parametrization on the tiny pool with the runner's own ``build_model``. The checks:

- it is a :class:`fusion.param.contract.Parametrization` with trainable parameters (``check_parametrization``);
- static result: ``merge_and_unload()`` is a plain frozen module whose outputs equal the wrapped model's (and differ
  from the pretrained model's); input-dependent (routers): ``merge_and_unload`` refuses and ``export()`` is the model
  itself in eval mode;
- gradients of the loop's per-task backward reach every trainable parameter, finite, not all zero;
- ``record()`` round-trips: what the report writes rebuilds a model with the same outputs;
- sharding is declared (single rank: the sharded merge equals the unsharded one) or refused with NotShardableError.

The last tests build deliberately broken parametrizations through the same Hydra path and show the suite rejects them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from fusion.methods.base import RunContext
from fusion.methods.learned import LearnedMethod
from fusion.param.coefficients import coefficient_merge
from fusion.param.contract import InputDependentError, NotShardableError, Parametrization, check_parametrization
from fusion.report.merge_files import read_mask, read_routed, write_merge_record
from fusion.train.objectives import Entropy
from fusion.utils import read_safetensors
from tests.helpers import Harness

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_method(name: str, *overrides: str):
    """``cfg.method`` of ``fusion method=<name> <overrides>``, instantiated as the app does."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={name}", *overrides])
    return instantiate(cfg.method)


def learned_stages() -> list[tuple[str, int]]:
    """``(config, stage index)`` for every stage of every learned config in conf/method/ (globbed, not listed)."""
    found = []
    for path in sorted(CONF.glob("method/*.yaml")):
        method = compose_method(path.stem)
        if isinstance(method, LearnedMethod):
            found += [(path.stem, i) for i in range(len(method.stages()))]
    return found


STAGES = learned_stages()


def build(config: str, stage: int, pool, *overrides: str, perturb: bool = True) -> nn.Module:
    """The parametrization of ``stage``, built by the runner on ``pool``; ``perturb``: its trainable parameters moved
    off their initial values (seeded), so that no check passes at a trivial point."""
    runner = compose_method(config, *overrides).stages()[stage]
    model = runner.build_model(pool, 0.3, RunContext(output_dir=Path(".")))
    if not perturb:
        return model
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ---- the checks (each raises AssertionError naming what broke) ---------------------------------------------------

def check_declared(model) -> None:
    check_parametrization(model, "test")
    assert isinstance(model, Parametrization), "not a Parametrization"
    assert isinstance(model.input_dependent, bool)


def check_result(model, pool) -> None:
    """Static: ``merge_and_unload`` equals the wrapped model; routers: refuse and export themselves."""
    x = images()
    with torch.no_grad():
        if model.input_dependent:
            with pytest.raises(InputDependentError):
                model.merge_and_unload()
            exported = model.export()
            assert exported is model and not model.training, "a router exports itself in eval mode"
            return
        plain = model.merge_and_unload()
        model.eval()
        assert not isinstance(plain, Parametrization) and not any(p.requires_grad for p in plain.parameters())
        assert torch.allclose(plain(x), model(x), atol=1e-5), "merge_and_unload differs from the wrapped model"
        assert not torch.allclose(plain(x), pool.encoder(x), atol=1e-4), "the merge is the pretrained model"


def check_gradients(model, pool) -> None:
    """One per-task forward/backward of the loop: every trainable parameter gets a finite gradient, not all zero."""
    model.train()
    batch = {t: (images(4, seed=i), None) for i, t in enumerate(pool.tasks)}
    try:
        Harness(model, pool.heads, Entropy(), torch.optim.Adam).task_losses(batch)
    except RuntimeError as err:  # autograd: the loss does not depend on anything that requires a gradient
        raise AssertionError(f"no gradient reaches the trainable parameters ({err})") from err
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, f"no gradient reaches {missing[:3]}"
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    assert sum(float(p.grad.abs().sum()) for p in trainable.values()) > 0, "every gradient is zero"


def check_record(model, config: str, stage: int, pool, tmp_path: Path, *overrides: str) -> None:
    """The files the report writes from ``record()`` rebuild a model whose outputs equal this one's."""
    record = model.record()
    write_merge_record(record, tmp_path, pool.tasks)
    x = images()
    with torch.no_grad():
        want = model.eval()(x)
        if model.input_dependent:
            rebuilt = read_routed(tmp_path / "routed_model", pool.encoder, pool.task_vectors())
        else:
            rebuilt = build(config, stage, pool, *overrides, perturb=False)
            saved = read_safetensors(tmp_path / "merge_parameters.safetensors")
            trainable = {n for n, p in rebuilt.named_parameters() if p.requires_grad}
            assert set(saved) == trainable, "merge_parameters.safetensors does not hold the trainable tensors"
            rebuilt.load_state_dict(saved, strict=False)
        assert torch.allclose(rebuilt.eval()(x), want, atol=1e-5), "the written record does not rebuild the model"
    if record.coefficients is not None:
        saved = json.loads((tmp_path / "coefficients.json").read_text())
        assert torch.equal(torch.tensor(saved["lambdas"]), record.coefficients.float())
    if record.mask is not None:
        loaded = read_mask(tmp_path / "mask.safetensors", pool.task_vectors())
        assert all(torch.equal(loaded[n], record.mask[n].float()) for n in record.mask)


def check_sharding(model) -> None:
    """Sharding is declared (one rank: the merge is unchanged) or refused with NotShardableError, nothing else."""
    x = images()
    with torch.no_grad():
        before = model.eval()(x)
        try:
            info = model.shard_task_vectors()
        except NotShardableError:
            assert model.sharding_info() is None
            return
        assert model.sharding_info() == info and info["world_size"] == 1
        assert torch.allclose(model(x), before, atol=1e-5), "the sharded merge differs from the unsharded one"


# ---- the suite over every learned config -------------------------------------------------------------------------

def test_the_suite_covers_every_kind_of_learned_config():
    configs = {c for c, _ in STAGES}
    assert {"adamerging_layer_wise", "concrete_task_arithmetic", "concrete_adamerging_task_wise", "wemoe",
            "sparse_wemoe", "smear"} <= configs
    assert ("concrete_adamerging_layer_wise", 1) in STAGES  # both phases of a two-phase method


@pytest.mark.parametrize("config, stage", STAGES)
def test_contract(config, stage, tiny_pool, tmp_path):
    check_declared(build(config, stage, tiny_pool))
    check_result(build(config, stage, tiny_pool), tiny_pool)
    check_gradients(build(config, stage, tiny_pool), tiny_pool)
    check_record(build(config, stage, tiny_pool), config, stage, tiny_pool, tmp_path)
    check_sharding(build(config, stage, tiny_pool))


# ---- the suite can fail ------------------------------------------------------------------------------------------

def stale_merge(base, task_vectors, init=0.3, layer_wise=True, clamp=None):
    """Broken: ``merge_and_unload`` returns the merge at the initial λ, whatever was learned."""
    model = coefficient_merge(base, task_vectors, init, layer_wise, clamp)
    initial = model.merge_and_unload()
    model.merge_and_unload = lambda: initial
    return model


def detached_merge(base, task_vectors, init=0.3, layer_wise=True, clamp=None):
    """Broken: the forward uses a detached copy of the merge, so no gradient reaches λ."""
    model = coefficient_merge(base, task_vectors, init, layer_wise, clamp)
    prepare = model.prepare
    model.prepare = lambda: {n: t.detach() for n, t in prepare().items()}
    return model


def forgetful_merge(base, task_vectors, init=0.3, layer_wise=True, clamp=None):
    """Broken: ``record()`` reports the coefficients at their initial value, not the learned ones."""
    model = coefficient_merge(base, task_vectors, init, layer_wise, clamp)
    record = model.record
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def stale_record():
        r = record()
        r.trainable = initial
        return r

    model.record = stale_record
    return model


@pytest.mark.parametrize("factory, check, message", [
    ("stale_merge", "result", "merge_and_unload differs"),
    ("detached_merge", "gradients", "no gradient reaches"),
    ("forgetful_merge", "record", "does not rebuild the model"),
])
def test_the_suite_rejects_a_broken_parametrization(factory, check, message, tiny_pool, tmp_path):
    broken = [f"method.model._target_=tests.test_contract.{factory}"]
    model = build("adamerging_layer_wise", 0, tiny_pool, *broken)
    checks = {"result": lambda: check_result(model, tiny_pool),
              "gradients": lambda: check_gradients(model, tiny_pool),
              "record": lambda: check_record(model, "adamerging_layer_wise", 0, tiny_pool, tmp_path, *broken)}
    with pytest.raises(AssertionError, match=message):
        checks[check]()
    check_result(build("adamerging_layer_wise", 0, tiny_pool), tiny_pool)  # the sound one passes


def test_an_object_without_the_contract_is_refused_at_the_runner(tiny_pool):
    from fusion.param.contract import ContractError

    with pytest.raises(ContractError, match="'adamerging_layer_wise'.*Linear is not a merge parametrization"):
        build("adamerging_layer_wise", 0, tiny_pool, "method.model._target_=tests.test_contract.not_a_merge")


def not_a_merge(base, task_vectors, init=0.3, layer_wise=True, clamp=None):
    return nn.Linear(2, 2)
