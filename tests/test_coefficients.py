"""Coefficient merges (AdaMerging task-/layer-wise, ++): exact properties against independent computations, the loop's
per-task backward, and sharded task vectors (trainer=fsdp; two real ranks here, the CLI in tests/test_operations.py).
The contract every learned config honours is tests/test_contract.py."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from fusion.merge.task_vectors import stack_task_vectors
from fusion.merge.ties import ties, ties_disjoint
from fusion.param.coefficients import layer_wise, task_wise
from fusion.param.merged import MergedEncoder
from fusion.train.objectives import Entropy
from tests.helpers import K, TinyHeads, batches, experts_of, tiny_encoder
from tests.helpers import Harness as _Harness

entropy = Entropy()

PARAMETRIZATIONS = {
    "task_wise": (task_wise, None, {}),
    "layer_wise": (layer_wise, None, {}),
    "layer_wise_clamped": (layer_wise, None, {"clamp": (0.0, 1.0)}),
    "adamerging_pp": (layer_wise, functools.partial(ties_disjoint, k=0.5), {}),
}


def build(name: str, init=0.3, k: int = K):
    factory, preprocess, kwargs = PARAMETRIZATIONS[name]
    base = tiny_encoder()
    tv = stack_task_vectors(base.state_dict(), experts_of(base, k))
    if preprocess:
        tv = preprocess(tv)
    weighting = factory(num_tasks=k, num_tensors=len(tv), init=init, **kwargs)
    return MergedEncoder(base, tv, weighting), tv


@pytest.mark.parametrize("name", list(PARAMETRIZATIONS))
def test_merge_and_unload_equals_wrapped(name):
    model, _ = build(name)
    with torch.no_grad():
        model.weighting.lambdas.add_(torch.rand_like(model.weighting.lambdas) * 0.2)
    x = torch.randn(5, 6)
    plain = model.merge_and_unload()
    assert isinstance(plain, nn.Sequential) and not any(p.requires_grad for p in plain.parameters())
    assert torch.allclose(plain(x), model(x), atol=1e-6)
    assert not torch.allclose(plain(x), model.base(x), atol=1e-3)  # differs from the pretrained model


@pytest.mark.parametrize("name", list(PARAMETRIZATIONS))
def test_functional_merge_equals_in_place_merge(name):
    model, tv = build(name)
    lam = model.weighting.coefficients().detach()
    manual = tiny_encoder()
    with torch.no_grad():
        for l, (n, p) in enumerate(manual.named_parameters()):
            c = lam if lam.dim() == 1 else lam[:, l]
            p.add_(sum(c[k] * tv[n][k] for k in range(K)))
    x = torch.randn(5, 6)
    assert torch.allclose(model(x), manual(x), atol=1e-6)


def test_single_expert_lambda_one_reproduces_expert():
    base = tiny_encoder()
    expert = experts_of(base, 1)[0]
    model = MergedEncoder(base, stack_task_vectors(base.state_dict(), [expert]), layer_wise(1, 6, init=1.0))
    reference = tiny_encoder()
    reference.load_state_dict(expert)
    x = torch.randn(5, 6)
    assert torch.allclose(model(x), reference(x), atol=1e-6)


@pytest.mark.parametrize("name", ["task_wise", "layer_wise", "adamerging_pp"])
def test_coefficient_gradient_is_inner_product_with_task_vector(name):
    model, tv = build(name)
    x = torch.randn(8, 6)
    state = model.prepare()
    loss = entropy(model(x, state))
    grads = torch.autograd.grad(loss, [model.weighting.lambdas, *state.values()])
    dlam, dtheta = grads[0], dict(zip(state, grads[1:]))
    expected = torch.stack([torch.stack([(dtheta[n] * tv[n][k]).sum() for n in model.names]) for k in range(K)])
    if dlam.dim() == 1:
        expected = expected.sum(1)
    assert torch.allclose(dlam, expected, atol=1e-6)
    assert dlam.abs().sum() > 0


def with_loop(name: str):
    """``(model, heads, batch, loop)``: the parametrization ``name``, frozen heads, one batch per task, the loop."""
    model, _ = build(name)
    heads = TinyHeads([f"t{i}" for i in range(K)])
    return model, heads, batches(), _Harness(model, heads, entropy, torch.optim.Adam)


@pytest.mark.parametrize("name", list(PARAMETRIZATIONS))
def test_per_task_backward_equals_summed_loss(name):
    model, heads, batch, loop = with_loop(name)
    loop.task_losses(batch)
    per_task = model.weighting.lambdas.grad.clone()
    model.weighting.lambdas.grad = None
    total = sum(entropy(heads(model(x), t)) for t, (x, _) in batch.items())
    total.backward()
    assert torch.allclose(per_task, model.weighting.lambdas.grad, atol=1e-6)


def test_non_finite_loss_or_gradient_is_caught_once_per_step_naming_the_task():
    from fusion.train.module import NonFiniteLossError

    model, heads, batch, loop = with_loop("layer_wise")
    losses = loop.task_losses(batch)
    loop.check_finite(losses)  # finite: passes
    bad = {**losses, "t1": torch.tensor(float("nan"))}
    with pytest.raises(NonFiniteLossError, match="on task 't1'"):
        loop.check_finite(bad)
    model.weighting.lambdas.grad[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="non-finite gradient"):
        loop.check_finite(losses)


@pytest.mark.parametrize("name", list(PARAMETRIZATIONS))
def test_entropy_steps_lower_entropy_and_move_coefficients(name):
    model, heads, batch, loop = with_loop(name)
    opt = torch.optim.Adam([model.weighting.lambdas], lr=0.05)
    before = model.weighting.lambdas.detach().clone()
    first = None
    for _ in range(15):
        opt.zero_grad()
        losses = loop.task_losses(batch)
        first = first if first is not None else float(sum(losses.values()))
        opt.step()
    last = float(sum(loop.task_losses(batch).values()))
    assert last < first - 1e-3
    assert not torch.allclose(before, model.weighting.lambdas.detach())
    if PARAMETRIZATIONS[name][2].get("clamp"):
        values = model.weighting.coefficients()
        assert values.min() >= 0.0 and values.max() <= 1.0


def test_adamerging_pp_preprocessing_is_the_ties_function():
    base = tiny_encoder()
    tv = stack_task_vectors(base.state_dict(), experts_of(base))
    processed = ties_disjoint(tv, k=0.5)
    # λ Σ_k of the processed vectors is exactly TIES' sum-merge
    merged = ties(tv, k=0.5, lam=0.4, aggregate="sum")
    for n in tv:
        assert torch.allclose(0.4 * processed[n].sum(0), merged[n])
    model, _ = build("adamerging_pp", init=0.4)
    for n, t in model.task_vectors().items():
        assert torch.equal(t, processed[n])
    assert any(not torch.equal(processed[n], tv[n]) for n in tv)


# ---- sharded task vectors (trainer=fsdp; two real ranks: tests/test_operations.py) ---------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_layout_chunks_reassemble_every_tensor(world):
    from fusion.param.sharding import ShardLayout

    _, tv = build("layer_wise")
    layouts = [ShardLayout.of(tv, rank, world) for rank in range(world)]
    rows = torch.stack([layout.shard(tv) for layout in layouts], dim=1)  # [K, world, width]
    expected_width = sum(-(-t[0].numel() // world) for t in tv.values())  # padded: 8 biases over 3 ranks = 3+3+2(+1)
    assert rows.shape == (K, world, expected_width)
    for k in range(K):
        full = layouts[0].assemble(rows[k])
        assert all(torch.equal(full[n], tv[n][k]) for n in tv)
    if world > 1:  # each rank holds a different part
        assert not torch.equal(rows[:, 0], rows[:, 1])


def concrete_model():
    from fusion.param.concrete import concrete_merge

    base = tiny_encoder()
    tv = stack_task_vectors(base.state_dict(), experts_of(base))
    return concrete_merge(base, tv, learn_coefficients="layer_wise")


@pytest.mark.parametrize("name", ["layer_wise", "adamerging_pp", "concrete"])
def test_sharded_merge_on_one_rank_equals_the_unsharded_merge(name):
    models = [concrete_model() if name == "concrete" else build(name)[0] for _ in range(2)]
    info = models[1].shard_task_vectors()
    assert models[1].sharding_info() == info and info["world_size"] == 1
    assert info["task_vector_numel_per_rank"] == info["task_vector_numel_unsharded"]
    assert not hasattr(models[1], "tv_0") and models[1].tv_shard.shape[0] == K
    with pytest.raises(RuntimeError, match="sharded"):
        models[1].task_vectors()
    heads, batch, grads = TinyHeads([f"t{i}" for i in range(K)]), batches(), []
    for model in models:
        torch.manual_seed(7)  # the same Concrete sample in both
        _Harness(model, heads, entropy, torch.optim.Adam).task_losses(batch)
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads)) and any(g.abs().sum() > 0 for g in grads[0])
    x = torch.randn(5, 6)
    assert torch.allclose(models[0].merge_and_unload()(x), models[1].merge_and_unload()(x), atol=1e-6)


def _two_rank_worker(rank: int, port: int, name: str, out: str) -> None:
    """Rank ``rank`` of 2 (gloo): the sharded merge's gradient on its half of the data, and the unsharded mean."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        heads, halves = TinyHeads([f"t{i}" for i in range(K)]), [batches(seed=s) for s in (0, 1)]
        models = [concrete_model() if name == "concrete" else build(name)[0] for _ in range(2)]
        with torch.no_grad():  # away from the initial values (mask logits 0, λ 0.3)
            for p in (p for m in models for p in m.parameters() if p.requires_grad):
                p.add_(torch.linspace(-0.2, 0.2, p.numel()).view_as(p))
        sharded, reference = models
        info = sharded.shard_task_vectors()
        torch.manual_seed(7)
        _Harness(sharded, heads, entropy, torch.optim.SGD).task_losses(halves[rank])
        for half in halves:  # DDP's gradient: the mean of the two ranks' gradients (same mask sample)
            torch.manual_seed(7)
            _Harness(reference, heads, entropy, torch.optim.SGD).task_losses(half)
        trainable = [[p for p in m.parameters() if p.requires_grad] for m in models]
        torch.save({"sharded": [p.grad for p in trainable[0]], "mean": [p.grad / 2 for p in trainable[1]],
                    "info": info, "local": sharded.tv_shard.clone()}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["layer_wise", "concrete"])
def test_sharded_gradients_on_two_ranks_equal_the_mean_gradient(name, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(port, name, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r in ranks:
        assert len(r["sharded"]) == len(r["mean"]) > 0
        for sharded, mean in zip(r["sharded"], r["mean"]):
            assert torch.allclose(sharded, mean, atol=1e-6), (sharded - mean).abs().max()
        assert any(g.abs().sum() > 1e-4 for g in r["mean"])
    _, tv = build("layer_wise")
    half, full = (K * sum(f(t[0].numel()) for t in tv.values()) for f in (lambda n: -(-n // 2), lambda n: n))
    assert [r["info"]["task_vector_numel_per_rank"] for r in ranks] == [half, half] and half < full
    assert not torch.equal(ranks[0]["local"], ranks[1]["local"])  # each rank holds its own half


def test_fsdp_refuses_merges_that_are_not_elementwise(tiny_pool):
    from fusion.param.concrete import ConcreteMask, ConcreteMergedEncoder
    from fusion.param.contract import NotShardableError
    from fusion.param.routed import wemoe
    from fusion.train.strategies import shard_merge

    routed = _Harness(wemoe(tiny_pool.encoder, tiny_pool.task_vectors()), tiny_pool.heads, entropy, torch.optim.Adam)
    with pytest.raises(NotShardableError, match="RoutedEncoder .*use trainer=ddp"):
        shard_merge(routed)
    base = tiny_encoder()
    tv = stack_task_vectors(base.state_dict(), experts_of(base))
    mask = ConcreteMask(task_wise(K, len(tv)), {n: t.shape[1:] for n, t in tv.items()}, factorized=False)
    with pytest.raises(NotShardableError, match="factorized"):
        ConcreteMergedEncoder(base, tv, mask).shard_task_vectors()


def test_bad_inputs():
    base = tiny_encoder()
    tv = stack_task_vectors(base.state_dict(), experts_of(base))
    with pytest.raises(ValueError, match="one value per task"):
        layer_wise(num_tasks=3, num_tensors=4, init=[0.1, 0.2])
    with pytest.raises(KeyError, match="not parameters of the base encoder"):
        MergedEncoder(base, {"nope.weight": tv["0.weight"]}, task_wise(3, 1))
