"""The contract every merge parametrization honours (STYLE.md habit 4), run for each one.

Static parametrizations: ``merge_and_unload()`` equals the wrapped model; gradients through the functional
merge equal an independent computation; the per-task backward of the loop equals one summed backward;
a few entropy steps lower the entropy. Later methods add themselves to PARAMETRIZATIONS.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from fusion.merge.task_vectors import stack_task_vectors
from fusion.merge.ties import ties, ties_disjoint
from fusion.param.coefficients import layer_wise, task_wise
from fusion.param.merged import MergedEncoder
from fusion.train.module import MergeTraining
from fusion.train.objectives import entropy

K = 3


def tiny_encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 5))


def experts_of(base: nn.Module, k: int = K, scale: float = 0.3) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [{n: p.detach() + scale * torch.randn(p.shape, generator=gen) for n, p in base.state_dict().items()}
            for _ in range(k)]


class TinyHeads(nn.Module):
    """Per-task linear heads over 5-d features (frozen)."""

    def __init__(self, tasks):
        super().__init__()
        torch.manual_seed(3)
        self.w = nn.ParameterDict({t: nn.Parameter(torch.randn(4, 5), requires_grad=False) for t in tasks})

    def forward(self, features, task):
        return features @ self.w[task].T


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


def batches(k: int = K, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i}": (torch.randn(8, 6, generator=gen), None) for i in range(k)}


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
    lam = model.weighting.values().detach()
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


class _Harness(MergeTraining):
    """MergeTraining with manual_backward = plain backward (no Trainer attached)."""

    def manual_backward(self, loss, *args, **kwargs):
        loss.backward(*args, **kwargs)


@pytest.mark.parametrize("name", list(PARAMETRIZATIONS))
def test_per_task_backward_equals_summed_loss(name):
    model, _ = build(name)
    heads = TinyHeads([f"t{i}" for i in range(K)])
    batch = batches()
    loop = _Harness(model, heads, entropy, torch.optim.Adam)
    loop.task_losses(batch)
    per_task = model.weighting.lambdas.grad.clone()
    model.weighting.lambdas.grad = None
    total = sum(entropy(heads(model(x), t)) for t, (x, _) in batch.items())
    total.backward()
    assert torch.allclose(per_task, model.weighting.lambdas.grad, atol=1e-6)


@pytest.mark.parametrize("name", list(PARAMETRIZATIONS))
def test_entropy_steps_lower_entropy_and_move_coefficients(name):
    model, _ = build(name)
    heads = TinyHeads([f"t{i}" for i in range(K)])
    batch = batches()
    loop = _Harness(model, heads, entropy, torch.optim.Adam)
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
        values = model.weighting.values()
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


def test_bad_inputs():
    base = tiny_encoder()
    tv = stack_task_vectors(base.state_dict(), experts_of(base))
    with pytest.raises(ValueError, match="one value per task"):
        layer_wise(num_tasks=3, num_tensors=4, init=[0.1, 0.2])
    with pytest.raises(KeyError, match="not parameters of the base encoder"):
        MergedEncoder(base, {"nope.weight": tv["0.weight"]}, task_wise(3, 1))
