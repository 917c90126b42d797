"""Task-vector arithmetic against hand computations, and pool validation errors."""
import pytest
import torch

from fusion.merge.combine import combine, simple_average, task_arithmetic
from fusion.merge.task_vectors import (PoolMismatchError, add_delta, flatten, stack_task_vectors, unflatten,
                                       validate_compatible)

THETA0 = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, -0.5]), "n": torch.tensor([3])}
E1 = {"w": torch.tensor([[2.0, 2.0], [3.0, 2.0]]), "b": torch.tensor([0.5, 0.5]), "n": torch.tensor([3])}
E2 = {"w": torch.tensor([[1.0, 0.0], [5.0, 4.0]]), "b": torch.tensor([1.5, -0.5]), "n": torch.tensor([3])}


def test_task_vector_by_hand():
    tv = stack_task_vectors(THETA0, [E1])
    assert set(tv) == {"w", "b"}  # integer buffers are not merged
    assert torch.equal(tv["w"][0], torch.tensor([[1.0, 0.0], [0.0, -2.0]]))
    assert torch.equal(tv["b"][0], torch.tensor([0.0, 1.0]))


def test_task_arithmetic_and_average_by_hand():
    tv = stack_task_vectors(THETA0, [E1, E2])
    assert tv["w"].shape == (2, 2, 2)
    ta = add_delta(THETA0, task_arithmetic(tv, lam=0.5))
    # θ0 + 0.5 (τ1 + τ2) with τ1 = [[1,0],[0,-2]], τ2 = [[0,-2],[2,0]]
    assert torch.allclose(ta["w"], torch.tensor([[1.5, 1.0], [4.0, 3.0]]))
    assert torch.equal(ta["n"], THETA0["n"])
    avg = add_delta(THETA0, simple_average(tv))
    assert torch.allclose(avg["w"], (E1["w"] + E2["w"]) / 2)
    assert torch.allclose(avg["b"], (E1["b"] + E2["b"]) / 2)
    assert not torch.allclose(avg["w"], THETA0["w"])


def test_layer_wise_combine_by_hand():
    tv = stack_task_vectors(THETA0, [E1, E2])
    coeffs = torch.tensor([[1.0, 0.0], [2.0, 3.0]])  # columns follow tv's order: b then w? check names
    names = list(tv)
    out = combine(tv, coeffs)
    for l, name in enumerate(names):
        expected = coeffs[0, l] * tv[name][0] + coeffs[1, l] * tv[name][1]
        assert torch.allclose(out[name], expected)
    with pytest.raises(ValueError, match="coefficients must have shape"):
        combine(tv, torch.ones(3))


def test_flatten_roundtrip():
    tv = stack_task_vectors(THETA0, [E1, E2])
    flat = flatten(tv)
    assert flat.shape == (2, 6)
    back = unflatten(flat, tv)
    assert all(torch.equal(back[k], tv[k]) for k in tv)


def test_mismatch_errors_name_key_and_file():
    bad_shape = dict(E1, w=torch.zeros(3, 2))
    with pytest.raises(PoolMismatchError, match=r"expert 'x' \(/tmp/x.safetensors\): key 'w' has shape \(3, 2\)"):
        validate_compatible(THETA0, bad_shape, name="expert 'x'", source="/tmp/x.safetensors")
    missing = {k: v for k, v in E1.items() if k != "b"}
    with pytest.raises(PoolMismatchError, match="key 'b' is missing"):
        validate_compatible(THETA0, missing)
    with pytest.raises(PoolMismatchError, match="dtype torch.float64"):
        validate_compatible(THETA0, dict(E1, b=E1["b"].double()))


def test_combine_over_bf16_task_vectors_keeps_only_bf16_for_the_backward():
    from fusion.merge.combine import combine

    gen = torch.Generator().manual_seed(0)
    tv = {"w": torch.randn(3, 64, 32, generator=gen).bfloat16(), "b": torch.randn(3, 32, generator=gen).bfloat16()}
    lam = torch.rand(3, 2, generator=gen, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        out = combine(tv, lam)
    assert all(x.dtype == torch.bfloat16 for x in saved if x.numel() > 3)  # no fp32 copy of τ kept
    assert out["w"].dtype == torch.float32
    g = {n: torch.randn(o.shape, generator=gen) for n, o in out.items()}
    sum((o * g[n]).sum() for n, o in out.items()).backward()
    ref = lam.detach().clone().requires_grad_(True)  # plain autograd over the fp32 upcast (independent)
    want = {n: torch.tensordot(ref[:, i], t.float(), dims=1) for i, (n, t) in enumerate(tv.items())}
    sum((o * g[n]).sum() for n, o in want.items()).backward()
    for n in tv:
        torch.testing.assert_close(out[n], want[n].detach(), rtol=0, atol=0)
    torch.testing.assert_close(lam.grad, ref.grad, rtol=1e-5, atol=1e-5)
    assert lam.grad.abs().sum() > 0
