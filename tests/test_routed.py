"""Routed merging (WEMoE, sparse WEMoE, SMEAR): exact properties on the tiny open_clip pool (2 blocks, width 32)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusion.evaluate import routing_matrix
from fusion.merge.task_vectors import stack_task_vectors
from fusion.param import routers
from fusion.param.contract import InputDependentError
from fusion.param.routed import RoutedEncoder, prune_per_tensor, smear, sparse_wemoe, wemoe
from fusion.param.routers import (SMEARRouter, auto_form, expert_dropout, routed_linear, routed_linear_experts,
                                  routed_linear_weights)
from fusion.report.merge_files import read_routed, write_merge_record
from fusion.train.module import MergeTraining
from fusion.train.objectives import Entropy

entropy = Entropy()

BLOCKS = ["transformer.resblocks.0.mlp", "transformer.resblocks.1.mlp"]
MLP_PARAMS = [f"{b}.{c}.{n}" for b in BLOCKS for c in ("c_fc", "c_proj") for n in ("weight", "bias")]


def images(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def ta_encoder(pool, lam: float = 0.3) -> nn.Module:
    """An independent task-arithmetic merge of every parameter."""
    enc = copy.deepcopy(pool.encoder)
    tv = pool.task_vectors()
    with torch.no_grad():
        for n, p in enc.named_parameters():
            p.add_(lam * tv[n].sum(0))
    return enc


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for b in model.blocks().values() for m in b.router.modules() if isinstance(m, nn.Linear)]


def randomize_routers(model: RoutedEncoder, seed: int = 0, std: float = 0.3) -> RoutedEncoder:
    """Larger router weights so that r(x) clearly differs between samples."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.router_state().items()):
            p.add_(std * torch.randn(p.shape, generator=gen))
    return model


def block_inputs(model: RoutedEncoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tokens every routed MLP receives (forward hooks)."""
    seen, hooks = {}, []
    for path, block in model.blocks().items():
        hooks.append(block.register_forward_hook(lambda m, inp, out, path=path: seen.__setitem__(path, inp[0])))
    model(x)
    for h in hooks:
        h.remove()
    return seen


# Default init (W ~ N(0, 0.01²), output bias 0.3): r(x) − 0.3 is ~0.01·‖token‖ for a linear router (‖·‖ ≈ √d after
# ln_2, d = 32 here: ~0.06) and second order in 0.01 for the 2-layer one; (tolerance on |r − 0.3|, on ‖f − f_TA‖/‖f_TA‖)
INIT_TOLERANCE = {0: (1e-6, 1e-5), 1: (0.15, 0.1), 2: (0.01, 0.01), "smear": (0.1, 0.05)}


@pytest.mark.parametrize("factory, kwargs", [(wemoe, {"depth": 2}), (wemoe, {"depth": 1}), (wemoe, {"depth": 0}),
                                             (smear, {})])
def test_init_equals_task_arithmetic(tiny_pool, factory, kwargs):
    x = images()
    ta = ta_encoder(tiny_pool)(x)
    assert not torch.allclose(ta, tiny_pool.encoder(x), atol=1e-3)  # TA is not the trivial answer
    model = factory(tiny_pool.encoder, tiny_pool.task_vectors(), init=0.3, **kwargs).eval()
    with torch.no_grad(), model.collect_routing() as rec:
        out = model(x)
    coefficients = torch.cat(list(rec.per_block().values()))
    r_tol, rel_tol = INIT_TOLERANCE[kwargs.get("depth", "smear")]
    assert (coefficients - 0.3).abs().max() < r_tol
    assert ((out - ta).norm(dim=-1) / ta.norm(dim=-1)).max() < rel_tol
    # router weights zeroed: exactly task arithmetic at 0.3 (up to float32 summation order)
    with torch.no_grad():
        for lin in linears(model):
            lin.weight.zero_()
        out = model(x)
    assert torch.allclose(out, ta, atol=1e-5), (out - ta).abs().max()


@pytest.mark.parametrize("shared", [True, False])
def test_routed_linear_forms_equal_a_per_sample_loop(shared):
    gen = torch.Generator().manual_seed(0)
    b, t, d_in, d_out, k = 4, 6, 5, 7, 3
    x, w0, b0 = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((b, t, d_in), (d_out, d_in), (d_out,)))
    tw, tb = torch.randn(k, d_out, d_in, generator=gen, dtype=torch.float64), torch.randn(k, d_out, dtype=torch.float64)
    r = torch.randn(1 if shared else b, k, generator=gen, dtype=torch.float64)
    loop = torch.stack([F.linear(x[i], w0 + torch.einsum("k,koi->oi", r[i * (not shared)], tw),
                                 b0 + r[i * (not shared)] @ tb) for i in range(b)])
    assert torch.allclose(routed_linear(x, w0, b0, tw, tb, r, form="auto"), loop, atol=1e-12)
    for form in (routed_linear_experts, routed_linear_weights):
        assert torch.allclose(form(x, w0, b0, tw, tb, r), loop, atol=1e-12)
        assert torch.allclose(form(x, w0, None, tw, None, r),
                              loop - (b0 + r @ tb).expand(b, d_out)[:, None, :], atol=1e-12)
    # the routing gradient (what training follows) is the same through both forms and the loop
    grads = []
    for fn in (routed_linear_experts, routed_linear_weights, None):
        rr = r.clone().requires_grad_()
        out = fn(x, w0, b0, tw, tb, rr) if fn else torch.stack(
            [F.linear(x[i], w0 + torch.einsum("k,koi->oi", rr[i * (not shared)], tw), b0 + rr[i * (not shared)] @ tb)
             for i in range(b)])
        (out * loop.sin()).sum().backward()
        grads.append(rr.grad)
    assert grads[2].abs().min() > 0 and all(torch.allclose(g, grads[2], atol=1e-10) for g in grads[:2])


def test_both_forms_in_chunks_equal_one_chunk_and_auto_picks_by_device_and_grad(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    b, t, d_in, d_out, k = 5, 3, 4, 6, 2
    x, w0, b0 = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((b, t, d_in), (d_out, d_in), (d_out,)))
    tw, tb = torch.randn(k, d_out, d_in, generator=gen, dtype=torch.float64), torch.randn(k, d_out, dtype=torch.float64)
    r = torch.randn(b, k, generator=gen, dtype=torch.float64)
    whole = routed_linear_weights(x, w0, b0, tw, tb, r)
    whole_experts = routed_linear_experts(x, w0, b0, tw, tb, r)
    assert routers.weights_chunk(x, w0) >= b and routers.experts_chunk(x, tw) >= b  # one chunk each
    monkeypatch.setitem(routers.MAX_WEIGHT_NUMEL, "cpu", 2 * d_out * d_in)  # chunks of 2, 2 and 1 samples
    monkeypatch.setattr(routers, "MAX_STACKED_NUMEL", 2 * t * (k + 1) * d_in)  # the same chunks
    assert routers.weights_chunk(x, w0) == 2 and routers.experts_chunk(x, tw) == 2
    chunked = routed_linear_weights(x, w0, b0, tw, tb, r)
    chunked_experts = routed_linear_experts(x, w0, b0, tw, tb, r)
    assert chunked.shape == (b, t, d_out) and torch.allclose(chunked, whole, atol=1e-12)
    assert torch.allclose(chunked_experts, whole_experts, atol=1e-12)
    assert torch.allclose(chunked, chunked_experts, atol=1e-12)
    assert not torch.allclose(chunked, F.linear(x, w0, b0), atol=1e-3)  # the task vectors do enter
    # CPU: per-sample weights when evaluating, expert outputs when autograd records; one r: a single merged weight
    assert auto_form(x, tw, r) == "weights"
    assert auto_form(x, tw, r.clone().requires_grad_()) == "experts"
    with torch.no_grad():
        assert auto_form(x, tw, r.clone().requires_grad_()) == "weights"
    assert auto_form(x, tw, r[:1].clone().requires_grad_()) == "weights"


def test_batched_routing_equals_per_sample_loop_and_explicit_merge(tiny_pool):
    tv, x = tiny_pool.task_vectors(), images(6)
    models = {f: randomize_routers(wemoe(tiny_pool.encoder, tv, form=f)).eval() for f in ("experts", "weights")}
    with torch.no_grad():
        for name, p in models["experts"].router_state().items():
            p.copy_(models["weights"].router_state()[name])
    with torch.no_grad(), models["weights"].collect_routing() as rec:
        batched = models["weights"](x)
        per_sample = torch.cat([models["weights"](x[i:i + 1]) for i in range(len(x))])
        assert torch.allclose(batched, models["experts"](x), atol=1e-5)
    assert torch.allclose(batched, per_sample, atol=1e-5)
    r = {b: w[: len(x)] for b, w in rec.per_block().items()}  # the batched pass came first
    assert (r[BLOCKS[0]].std(0) > 1e-2).all()  # routing really differs between samples
    ta_state = ta_encoder(tiny_pool).state_dict()
    theta0 = tiny_pool.pretrained_state()
    for i in range(len(x)):  # a plain encoder holding θ0^mlp + Σ_k r_k(x_i) τ_k in every block
        enc = copy.deepcopy(tiny_pool.encoder)
        state = dict(ta_state)
        for name in MLP_PARAMS:
            block = name.rsplit(".", 2)[0]
            state[name] = theta0[name] + torch.einsum("k,k...->...", r[block][i], tv[name])
        enc.load_state_dict(state)
        assert torch.allclose(enc(x[i:i + 1]), batched[i:i + 1], atol=1e-5)


class ToyMLP(nn.Module):
    """Hugging Face CLIPMLP's layout: activation_fn, fc1, fc2."""

    def __init__(self, d: int):
        super().__init__()
        self.activation_fn, self.fc1, self.fc2 = nn.GELU(), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class ToyEncoder(nn.Module):
    """Pre-LN residual MLP blocks at ``layers.<i>.mlp`` over tokens ``[B, T, d]`` (or ``[T, B, d]`` inside)."""

    def __init__(self, d: int = 8, batch_first: bool = True):
        super().__init__()
        self.embed, self.batch_first = nn.Linear(4, d), batch_first
        self.layers = nn.ModuleList([nn.ModuleDict({"ln": nn.LayerNorm(d), "mlp": ToyMLP(d)}) for _ in range(2)])

    def forward(self, x):
        h = self.embed(x) if self.batch_first else self.embed(x).transpose(0, 1)
        for layer in self.layers:
            h = h + layer["mlp"](layer["ln"](h))
        return (h if self.batch_first else h.transpose(0, 1)).mean(1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_hf_style_fc1_fc2_and_token_layout(batch_first):
    torch.manual_seed(0)
    base = ToyEncoder(batch_first=batch_first)
    experts = [{n: v + 0.2 * torch.randn_like(v) for n, v in base.state_dict().items()} for _ in range(3)]
    tv = stack_task_vectors(base.state_dict(), experts)
    model = randomize_routers(wemoe(base, tv, depth=1), std=1.0).eval()
    assert list(model.blocks()) == ["layers.0.mlp", "layers.1.mlp"]
    x = torch.randn(5, 3, 4)
    with torch.no_grad():
        batched = model(x)
        assert torch.allclose(batched, torch.cat([model(x[i:i + 1]) for i in range(5)]), atol=1e-5)
        for lin in linears(model):  # depth 1: r = W h + b → 0.3
            lin.weight.zero_()
            lin.bias.fill_(0.3)
        ta = copy.deepcopy(base)
        for n, p in ta.named_parameters():
            p.add_(0.3 * tv[n].sum(0))
        assert torch.allclose(model(x), ta(x), atol=1e-5) and not torch.allclose(batched, ta(x), atol=1e-3)


@pytest.mark.parametrize("depth", [0, 2])
def test_one_hot_router_reproduces_expert_mlp(tiny_pool, depth):
    model = wemoe(tiny_pool.encoder, tiny_pool.task_vectors(), depth=depth).eval()
    tokens = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    for k, task in enumerate(tiny_pool.tasks):
        for path, block in model.blocks().items():
            with torch.no_grad():
                if depth == 0:
                    block.router.constant.copy_(F.one_hot(torch.tensor(k), 3).float())
                else:
                    for lin in block.router.modules():
                        if isinstance(lin, nn.Linear):
                            lin.weight.zero_()
                    block.router.net[-1].bias.copy_(F.one_hot(torch.tensor(k), 3).float())
            expert = copy.deepcopy(tiny_pool.encoder.get_submodule(path))
            expert.load_state_dict({n: tiny_pool.experts[task][f"{path}.{n}"] for n in expert.state_dict()})
            assert torch.allclose(block(tokens), expert(tokens), atol=1e-6)
            assert not torch.allclose(block(tokens), tiny_pool.encoder.get_submodule(path)(tokens), atol=1e-4)


def test_smear_weights_sum_to_one_and_dropout_renormalises():
    router = SMEARRouter(8, num_experts=4, dropout=0.5)
    with torch.no_grad():
        router.linear.weight.normal_()
    x = torch.randn(64, 3, 8, generator=torch.Generator().manual_seed(0))
    p = router.eval()(x)
    assert torch.allclose(p.sum(-1), torch.ones(64)) and (p > 0).all()
    torch.manual_seed(0)
    q = router.train()(x)
    kept = q > 0
    assert torch.allclose(q.sum(-1), torch.ones(64)) and (~kept).any() and kept.any(-1).all()
    expected = p * kept / (p * kept).sum(-1, keepdim=True)
    assert torch.allclose(q, expected, atol=1e-6)
    all_dropped = expert_dropout(torch.tensor([[0.2, 0.8]]), rate=0.999999)  # nothing kept: probabilities unchanged
    assert torch.allclose(all_dropped, torch.tensor([[0.2, 0.8]]))


def test_smear_scale_and_routing_stats(tiny_pool):
    model = smear(tiny_pool.encoder, tiny_pool.task_vectors(), init=0.3).eval()
    with torch.no_grad():
        model(images())
    stats = model.stats()
    assert stats["routing_scale"] == pytest.approx(0.9) and stats["routing_mean"] == pytest.approx(0.3, abs=1e-6)
    fixed = smear(tiny_pool.encoder, tiny_pool.task_vectors(), learn_scale=False).eval()
    with torch.no_grad(), fixed.collect_routing() as rec:
        fixed(images())
    for w in rec.per_block().values():
        assert torch.allclose(w.sum(-1), torch.ones(len(w)))


@pytest.mark.parametrize("factory", [wemoe, sparse_wemoe, smear])
def test_save_load_is_identical(tiny_pool, tmp_path, factory):
    before = {k: v.clone() for k, v in tiny_pool.encoder.state_dict().items()}
    tv, x = tiny_pool.task_vectors(), images()
    model = randomize_routers(factory(tiny_pool.encoder, tv)).eval()
    described = write_merge_record(model.record(), tmp_path, tiny_pool.tasks)
    assert described == {"routed_model": tmp_path / "routed_model"}  # no routing measured: no routing files
    loaded = read_routed(tmp_path / "routed_model", tiny_pool.encoder, tv)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
        assert not torch.allclose(loaded(x), factory(tiny_pool.encoder, tv).eval()(x), atol=1e-4)
    assert json.loads((tmp_path / "routed_model" / "routed_config.json").read_text())["num_experts"] == 3
    assert all(torch.equal(v, tiny_pool.encoder.state_dict()[k]) for k, v in before.items())  # base untouched


class _Harness(MergeTraining):
    def manual_backward(self, loss, *args, **kwargs):
        loss.backward(*args, **kwargs)


@pytest.mark.parametrize("factory", [wemoe, sparse_wemoe, smear])
def test_gradients_reach_only_the_routers(tiny_pool, factory):
    model = factory(tiny_pool.encoder, tiny_pool.task_vectors())
    assert model.prepare() == {}
    batch = {t: (images(4, seed=i), None) for i, t in enumerate(tiny_pool.tasks)}
    losses = _Harness(model, tiny_pool.heads, entropy, torch.optim.Adam).task_losses(batch)
    assert set(losses) == set(tiny_pool.tasks)
    routers = model.router_state()
    assert routers and all(p.requires_grad for p in routers.values())
    for name, p in model.named_parameters():
        if name in routers:
            assert p.grad is not None and torch.isfinite(p.grad).all()
        else:
            assert p.grad is None and not p.requires_grad, name
    assert sum(float(p.grad.abs().sum()) for p in routers.values()) > 0
    assert all(p.grad is None for p in tiny_pool.encoder.parameters())


def test_merge_and_unload_refuses(tiny_pool):
    model = wemoe(tiny_pool.encoder, tiny_pool.task_vectors())
    assert model.input_dependent
    with pytest.raises(InputDependentError, match="routed_model/"):
        model.merge_and_unload()


def test_bad_inputs(tiny_pool):
    plain = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 5))
    tv_plain = stack_task_vectors(plain.state_dict(), [plain.state_dict()] * 2)
    with pytest.raises(ValueError, match=r"mlp_pattern.*\['0', '1', '2'\]"):
        wemoe(plain, tv_plain)
    tv = tiny_pool.task_vectors()
    with pytest.raises(ValueError, match="depth must be 0.*got 3"):
        wemoe(tiny_pool.encoder, tv, depth=3)
    for keep in (0, 1.5):
        with pytest.raises(ValueError, match=r"keep is the kept fraction and must lie in \(0, 1\]"):
            sparse_wemoe(tiny_pool.encoder, tv, keep=keep)
    with pytest.raises(ValueError, match="expert_dropout"):
        smear(tiny_pool.encoder, tv, expert_dropout=1.0)
    with pytest.raises(ValueError, match="form must be one of"):
        wemoe(tiny_pool.encoder, tv, form="loop")
    with pytest.raises(KeyError, match="MLP parameters"):
        wemoe(tiny_pool.encoder, {n: t for n, t in tv.items() if "c_proj" not in n})


def test_sparse_pruning_keeps_the_fraction_per_tensor(tiny_pool):
    tv = tiny_pool.task_vectors()
    pruned = prune_per_tensor({n: tv[n] for n in MLP_PARAMS}, keep=0.1)
    for name, t in pruned.items():
        flat, orig = t.reshape(3, -1), tv[name].reshape(3, -1)
        n_keep = math.ceil(0.1 * flat.shape[1] - 1e-9)
        assert ((flat != 0).sum(1) == n_keep).all(), name
        kept = flat != 0
        assert torch.equal(flat[kept], orig[kept])
        for k in range(3):  # the kept entries are the largest in magnitude
            assert orig[k][kept[k]].abs().min() >= orig[k][~kept[k]].abs().max()
    model = sparse_wemoe(tiny_pool.encoder, tv)
    blocks = list(model.blocks().values())
    assert blocks[0].router is blocks[1].router  # one shared router
    assert torch.equal(blocks[0].tw_1, pruned[f"{BLOCKS[0]}.c_fc.weight"])
    assert len(model.router_state()) == 4  # d→d and d→K layers, weight + bias, once


def test_batch_reduce_averages_routing_in_training_only(tiny_pool):
    model = randomize_routers(wemoe(tiny_pool.encoder, tiny_pool.task_vectors(), batch_reduce=True))
    x = images(6)
    first = model.blocks()[BLOCKS[0]]
    with torch.no_grad():
        tokens = block_inputs(model.eval(), x)[BLOCKS[0]]
        per_sample = first.weights(tokens)
        model.train()
        reduced = first.weights(tokens)
    assert per_sample.shape == (6, 3) and reduced.shape == (1, 3)
    assert torch.allclose(reduced[0], per_sample.mean(0), atol=1e-6)


def test_record_writes_routing_plot_and_model(tiny_pool, tiny_taskpool, tmp_path):
    model = randomize_routers(wemoe(tiny_pool.encoder, tiny_pool.task_vectors()))
    record = model.record()
    record.routing = routing_matrix(model, tiny_taskpool, tiny_pool.tasks)
    assert model.training  # the mode is restored
    paths = write_merge_record(record, tmp_path, tiny_pool.tasks)
    assert paths["routing_plot"].stat().st_size > 1000
    matrix = torch.tensor(json.loads((tmp_path / "routing.json").read_text())["mean_routing_weight"])
    assert torch.equal(matrix, record.routing)
    assert matrix.shape == (3, 3) and not torch.allclose(matrix, torch.full_like(matrix, 0.3), atol=1e-3)
    loaded = read_routed(paths["routed_model"], tiny_pool.encoder, tiny_pool.task_vectors())
    with torch.no_grad():
        assert torch.equal(loaded(images()), model.eval()(images()))


@pytest.mark.parametrize("method", ["wemoe", "smear"])
def test_app_runs_routed_methods(tiny_dirs, tmp_path, method):
    from tests.test_app import run_app

    res = run_app(tiny_dirs, tmp_path, method, "method.steps=3")
    assert list(res["per_task"]) == ["alpha", "beta", "gamma"]
    assert res["mean_accuracy"] == pytest.approx(sum(res["per_task"].values()) / 3)
    info = res["method_info"]
    assert info["steps"] == 3 and info["trainable_parameters"] > 0 and "routing_mean" in info
    if method == "wemoe":
        assert "entropy" in res["protocol"] and "transductive" in res["protocol"]
    else:
        assert "cross_entropy on the labeled val split" in res["protocol"]
    assert (tmp_path / "merge_parameters.safetensors").is_file()
    assert (tmp_path / "routing.png").stat().st_size > 1000


def test_routing_matrix_reads_the_first_images_of_each_task(tiny_pool, tiny_taskpool):
    model = randomize_routers(wemoe(tiny_pool.encoder, tiny_pool.task_vectors())).eval()
    sub = routing_matrix(model, tiny_taskpool, tiny_pool.tasks, max_images=4)
    full = routing_matrix(model, tiny_taskpool, tiny_pool.tasks, max_images=None)
    expected = []
    with torch.no_grad(), model.collect_routing() as rec:
        for task in tiny_pool.tasks:
            rec.clear()
            data = tiny_taskpool.dataset(task, "test")
            x = torch.stack([data[i][0] for i in range(4)])
            model(x)
            expected.append(torch.stack([w.mean(0) for w in rec.per_block().values()]).mean(0))
    assert torch.allclose(sub, torch.stack(expected), atol=1e-6)
    assert not torch.allclose(sub, full, atol=1e-6)  # the full split gives another mean
