"""Routed merging (WEMoE, sparse WEMoE, SMEAR) on any transformer MLP (issue 19, item 3): every ``nn.Linear`` below
a matched module is routed and the module's own forward runs unchanged — gated (Llama's gate/up/down, T5 v1.1's
wi_0/wi_1/wo), plain (GPT-2, T5's wi/wo) and the two-linear open_clip / HF CLIP layouts; the MLP pattern a pool
declares is the default (GPT-2 text pool, through the CLI); BERT/RoBERTa are refused with the message that says why.

Exact comparisons are in float64 (tolerance 1e-10) against an independent computation: a copy of the module whose
linears hold ``θ_0 + Σ_k r_bk τ_k``, called on sample ``b`` alone; the two-linear formula of the first
implementation is compared bit for bit in float32.
"""
from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from fusion.merge.task_vectors import HyperparameterError, stack_task_vectors
from fusion.methods.base import RunContext
from fusion.param.routed import MLP_PATTERN, RoutedLinear, resolve_mlp_pattern, smear, sparse_wemoe, wemoe
from fusion.param.routers import routed_linear
from fusion.pools.contract import PoolContractError, check_model_pool
from fusion.report.merge_files import read_routed

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

from tests.test_text_backbone import TASKS, build_data, build_models, cli, make_pool, results  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
GPT2_MLP = r"(^|\.)h\.\d+\.mlp$"
TOL = 1e-10  # float64
K = 3


# ---- MLP modules of several layouts ----------------------------------------------------------------------------------

class GatedMLP(nn.Module):
    """Llama's SiLU-gated MLP with the gate and up projections nested one level down (routing must find them)."""

    def __init__(self, d: int = 6, h: int = 10):
        super().__init__()
        self.proj = nn.ModuleDict({"gate": nn.Linear(d, h, bias=False), "up": nn.Linear(d, h)})
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return self.down(nn.functional.silu(self.proj["gate"](x)) * self.proj["up"](x))


class FC1FC2(nn.Module):
    """Hugging Face CLIPMLP's layout: the activation declared before fc1/fc2."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.activation_fn, self.fc1, self.fc2 = nn.GELU(), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


def t5_config(gated: bool):
    return transformers.T5Config(d_model=6, d_ff=10, dropout_rate=0.1, is_gated_act=gated,
                                 dense_act_fn="gelu_new" if gated else "relu")


def build_mlp(kind: str) -> nn.Module:
    """A width-6 MLP of ``kind``, in float64."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense

    from fusion.pools.hf_text import linear_from_conv1d

    torch.manual_seed(0)
    mlp = {
        "gated": lambda: GatedMLP(),
        "llama": lambda: LlamaMLP(transformers.LlamaConfig(hidden_size=6, intermediate_size=10, num_attention_heads=2,
                                                                   num_key_value_heads=2)),
        "t5_gated": lambda: T5DenseGatedActDense(t5_config(True)),
        "t5": lambda: T5DenseActDense(t5_config(False)),
        "gpt2": lambda: linear_from_conv1d(GPT2MLP(10, transformers.GPT2Config(n_embd=6))),
        "fc1_fc2": lambda: FC1FC2(),
        "open_clip": lambda: nn.Sequential(OrderedDict(c_fc=nn.Linear(6, 12), gelu=nn.GELU(),
                                                       c_proj=nn.Linear(12, 6))),
    }[kind]()
    return mlp.double()


class FixedRouter(nn.Module):
    """Returns the given routing weights ``r [B, K]`` whatever the tokens."""

    def __init__(self, r: torch.Tensor):
        super().__init__()
        self.r = r

    def forward(self, x):
        return self.r


def experts_of(module: nn.Module, n: int = K, scale: float = 0.3) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [{k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in module.state_dict().items()}
            for _ in range(n)]


def routed_single_mlp(kind: str, factory=wemoe, **kwargs):
    """``(routed model, θ_0 MLP, stacked task vectors)`` for one MLP of ``kind`` at path ``mlp``."""
    base = nn.ModuleDict({"mlp": build_mlp(kind)}).eval()
    tv = stack_task_vectors(base.state_dict(), experts_of(base))
    model = factory(base, tv, mlp_pattern=r"^mlp$", **kwargs).eval()
    return model, base["mlp"], tv


def per_sample(mlp: nn.Module, tv: dict, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """For each sample b: a copy of ``mlp`` whose every linear holds ``θ_0 + Σ_k r_bk τ_k``, called on ``x[b]``."""
    outs = []
    for b in range(x.shape[0]):
        merged = copy.deepcopy(mlp)
        with torch.no_grad():
            for path, m in merged.named_modules():
                if isinstance(m, nn.Linear):
                    for name, p in m.named_parameters():
                        p.add_(torch.einsum("k,k...->...", r[b], tv[f"mlp.{path}.{name}"]))
        outs.append(merged(x[b:b + 1]))
    return torch.cat(outs)


@pytest.mark.parametrize("kind, linears", [
    ("gated", ["proj.gate", "proj.up", "down"]), ("llama", ["gate_proj", "up_proj", "down_proj"]),
    ("t5_gated", ["wi_0", "wi_1", "wo"]), ("t5", ["wi", "wo"]), ("gpt2", ["c_fc", "c_proj"]),
    ("fc1_fc2", ["fc1", "fc2"]), ("open_clip", ["c_fc", "c_proj"])])
def test_routed_mlp_equals_a_per_sample_merged_copy(kind, linears):
    model, mlp, tv = routed_single_mlp(kind)
    block = model.blocks()["mlp"]
    assert block.linears == linears
    assert all(isinstance(block.mlp.get_submodule(p), RoutedLinear) for p in linears)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 6, generator=gen, dtype=torch.float64)
    r = torch.randn(4, K, generator=gen, dtype=torch.float64)
    block.router = FixedRouter(r)
    with torch.no_grad():
        out = block(x)
        want = per_sample(mlp, tv, r, x)
        assert out.shape == x.shape and (out - want).abs().max() < TOL
        assert (out - mlp(x)).abs().max() > 1e-2  # the task vectors do enter
        assert (out - per_sample(mlp, tv, r[[1, 0, 3, 2]], x)).abs().max() > 1e-2  # each sample its own r
    assert all(slot.route is None for slot in block.mlp.modules() if isinstance(slot, RoutedLinear))


def test_the_two_linear_formula_is_unchanged_bit_for_bit():
    """The first implementation computed ``second(activation(first(x)))`` with routed linears; the block calls the
    module's own forward around routed linears: the same operations, so the same bits (float32, both forms)."""
    base = ToyEncoder()
    tv = stack_task_vectors(base.state_dict(), experts_of(base))
    x = torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(2))
    for form in ("experts", "weights"):
        model = wemoe(base, tv, depth=1, form=form).eval()
        for path, block in model.blocks().items():
            with torch.no_grad():
                for lin in block.router.modules():
                    if isinstance(lin, nn.Linear):
                        lin.weight.normal_(generator=torch.Generator().manual_seed(3))
            tokens = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(4))
            with torch.no_grad():
                r = block.weights(tokens)
                assert r.std(0).min() > 1e-2
                old = routed_linear(block.mlp.activation_fn(
                    routed_linear(tokens, block.w0_1, block.b0_1, block.tw_1, block.tb_1, r, form)),
                    block.w0_2, block.b0_2, block.tw_2, block.tb_2, r, form)
                assert torch.equal(block(tokens), old), path
        with torch.no_grad():
            assert model(x).shape == (5, 8)


class ToyEncoder(nn.Module):
    """Pre-LN residual MLP blocks at ``layers.<i>.mlp`` (fc1/fc2) over tokens ``[B, T, d]``."""

    def __init__(self, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, d)
        self.layers = nn.ModuleList([nn.ModuleDict({"ln": nn.LayerNorm(d), "mlp": FC1FC2(d)}) for _ in range(2)])

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = h + layer["mlp"](layer["ln"](h))
        return h.mean(1)


def test_sparse_wemoe_and_smear_route_every_linear_of_a_gated_mlp():
    model, mlp, tv = routed_single_mlp("t5_gated", sparse_wemoe, keep=0.5)
    block = model.blocks()["mlp"]
    for i, path in enumerate(block.linears, 1):  # each linear's task vectors pruned per tensor to half
        kept = (getattr(block, f"tw_{i}").reshape(K, -1) != 0).sum(1)
        assert (kept == -(-tv[f"mlp.{path}.weight"][0].numel() // 2)).all(), path
    model, mlp, tv = routed_single_mlp("llama", smear, expert_dropout=0.0)
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad(), model.collect_routing() as rec:
        out = model.blocks()["mlp"](x)
    r = rec.per_block()["mlp"].double()
    assert torch.allclose(r.sum(1), torch.full((3,), 0.3 * K, dtype=torch.float64), atol=1e-6)  # s · softmax
    assert (out - per_sample(mlp, tv, r, x)).abs().max() < 1e-6  # r was recorded in float32


def test_bad_mlps_are_clear_errors():
    one = nn.ModuleDict({"mlp": nn.Sequential(nn.Linear(4, 4), nn.GELU())})
    with pytest.raises(HyperparameterError, match=r"at least two nn.Linear.*without them: \['mlp'\]"):
        wemoe(one, stack_task_vectors(one.state_dict(), experts_of(one, 2)), mlp_pattern=r"^mlp$")
    nested = nn.ModuleDict({"mlp": nn.ModuleDict({"inner_mlp": FC1FC2(4), "out": nn.Linear(4, 4)})})
    with pytest.raises(HyperparameterError, match="matches module 'mlp.inner_mlp' inside the matched module 'mlp'"):
        wemoe(nested, stack_task_vectors(nested.state_dict(), experts_of(nested, 2)), mlp_pattern=r"mlp$")

    class Flattening(FC1FC2):
        def forward(self, x):
            return super().forward(x.flatten(0, 1)).view_as(x)

    class DownFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.down, self.up = nn.Linear(8, 4), nn.Linear(4, 8)

        def forward(self, x):
            return self.down(self.up(x).relu())

    x = torch.randn(2, 3, 4)
    for mlp, message in ((Flattening(4), r"takes tokens \[B, T, 4\].*got \(6, 4\)"),
                         (DownFirst(), "receives tokens of width 4, but its router was built for 8")):
        base = nn.ModuleDict({"mlp": mlp})
        model = wemoe(base, stack_task_vectors(base.state_dict(), experts_of(base, 2)), mlp_pattern=r"^mlp$")
        with pytest.raises(ValueError, match=message):
            model.blocks()["mlp"](x)


def test_the_pattern_is_the_methods_then_the_pools_then_the_default():
    assert resolve_mlp_pattern("a", "b") == "a" and resolve_mlp_pattern(None, "b") == "b"
    assert resolve_mlp_pattern(None, None) == MLP_PATTERN
    base = ToyEncoder()
    tv = stack_task_vectors(base.state_dict(), experts_of(base))
    assert list(wemoe(base, tv).blocks()) == ["layers.0.mlp", "layers.1.mlp"]
    only_first = wemoe(base, tv, pool_mlp_pattern=r"layers\.0\.mlp$")
    assert list(only_first.blocks()) == ["layers.0.mlp"]
    assert only_first.spec["kwargs"]["mlp_pattern"] == r"layers\.0\.mlp$"  # what a saved model is rebuilt with
    assert list(wemoe(base, tv, mlp_pattern=r"layers\.1\.mlp$", pool_mlp_pattern=r"layers\.0\.mlp$").blocks()) == [
        "layers.1.mlp"]


def test_a_bfloat16_mlp_is_routed_by_float32_routers():
    mlp = build_mlp("llama").to(torch.bfloat16)
    base = nn.ModuleDict({"mlp": mlp})
    model = wemoe(base, stack_task_vectors(base.state_dict(), experts_of(base)), mlp_pattern=r"^mlp$",
                  batch_reduce=False)  # per sample in training: the expert-output form
    block = model.blocks()["mlp"]
    assert all(p.dtype == torch.float32 for p in block.router.parameters())
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    out = block(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and torch.isfinite(out).all()
    out.float().square().sum().backward()
    grads = [p.grad for p in block.router.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


# ---- a Llama model, built in memory ---------------------------------------------------------------------------------

class LlamaFeatures(nn.Module):
    """Token ids ``[B, T]`` -> the mean of a LlamaModel's last hidden states ``[B, d]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).last_hidden_state.mean(1)


def test_a_llama_model_routes_its_gated_mlps_and_a_constant_routing_is_one_static_merge():
    from torch.func import functional_call

    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = LlamaFeatures(transformers.LlamaModel(config)).double().eval()
    theta0 = base.state_dict()
    tv = stack_task_vectors(theta0, experts_of(base, scale=0.05))
    ids = torch.randint(0, 32, (4, 7), generator=torch.Generator().manual_seed(1))
    pattern = r"(^|\.)layers\.\d+\.mlp$"
    routed = wemoe(base, tv, depth=2, mlp_pattern=pattern).eval()
    assert list(routed.blocks()) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(b.linears == ["gate_proj", "up_proj", "down_proj"] for b in routed.blocks().values())
    with torch.no_grad():
        out = routed(ids)
        assert out.shape == (4, 16) and (out - base(ids)).abs().max() > 1e-3
        assert (out - torch.cat([routed(ids[i:i + 1]) for i in range(4)])).abs().max() < TOL

    constant = wemoe(base, tv, init=0.3, depth=0, mlp_pattern=pattern).eval()
    gen = torch.Generator().manual_seed(2)
    r = {path: torch.randn(K, generator=gen) for path in constant.blocks()}
    lam = float(torch.tensor(0.3))  # λ_0 as the model holds it (float32)
    state = {n: v + lam * tv[n].sum(0) if n in tv else v for n, v in theta0.items()}  # TA outside the MLPs
    with torch.no_grad():
        for path, block in constant.blocks().items():
            block.router.constant.copy_(r[path])
            for lin in block.linears:
                name = f"{path}.{lin}.weight"
                state[name] = theta0[name] + torch.einsum("k,k...->...", r[path].double(), tv[name])
        got, want = constant(ids), functional_call(base, state, (ids,))
    assert (got - want).abs().max() < TOL and (got - out).abs().max() > 1e-3


# ---- text pools: the pool's declared pattern, through the runner and the CLI ----------------------------------------

@pytest.fixture(scope="module")
def text_root(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("text")
    return {"data": build_data(root / "data"), **{k: build_models(root, k) for k in ("gpt2", "roberta")}, "root": root}


def compose_method(name: str, *overrides: str):
    """``cfg.method`` of ``fusion method=<name> <overrides>``, instantiated as the app does."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={name}", *overrides])
    return instantiate(cfg.method)


def test_the_runner_gives_routed_methods_the_pools_pattern(text_root):
    gpt2 = check_model_pool(make_pool(text_root["gpt2"]), "gpt2")
    assert gpt2.mlp_pattern == GPT2_MLP and gpt2.select(["sst2"]).mlp_pattern == GPT2_MLP
    ctx = RunContext(output_dir=Path("."))
    for method in ("wemoe", "sparse_wemoe", "smear"):
        model = compose_method(method).build_model(gpt2, 0.3, ctx)
        assert list(model.blocks()) == ["body.h.0.mlp", "body.h.1.mlp"], method
        assert model.spec["kwargs"]["mlp_pattern"] == GPT2_MLP
    only_first = compose_method("wemoe", r"method.model.mlp_pattern='(^|\.)h\.0\.mlp$'").build_model(gpt2, 0.3, ctx)
    assert list(only_first.blocks()) == ["body.h.0.mlp"]  # the method's pattern wins over the pool's

    roberta = make_pool(text_root["roberta"])
    assert roberta.mlp_pattern is None
    with pytest.raises(HyperparameterError, match="no transformer MLP blocks found.*BERT/RoBERTa.*cannot be routed"):
        compose_method("wemoe").build_model(roberta, 0.3, ctx)


def test_a_pool_must_declare_its_mlp_pattern_even_if_none(text_root):
    pool = make_pool(text_root["gpt2"])
    fields = {n: getattr(pool, n) for n in ("name", "encoder", "heads", "manifest", "exporter")}

    class NoPattern:  # every member of the contract but mlp_pattern
        tasks, candidates, pool_hash = pool.tasks, pool.candidates, pool.pool_hash
        to, task_vectors, pretrained_state = pool.to, pool.task_vectors, pool.pretrained_state
        expert_state, expert_encoder, content_key = pool.expert_state, pool.expert_encoder, pool.content_key

        def __init__(self):
            self.__dict__.update(fields)

    with pytest.raises(PoolContractError, match=r"it lacks \['mlp_pattern'\]"):
        check_model_pool(NoPattern(), "modelpool")


def test_wemoe_and_smear_route_a_gpt2_text_pool_by_its_declared_pattern(text_root, tmp_path):
    done = cli(text_root, "gpt2", ["wemoe", "smear"], tmp_path / "routed")  # no mlp_pattern given
    assert done.returncode == 0, done.stderr[-4000:]
    runs = results(tmp_path / "routed")
    assert sorted(runs) == ["smear", "wemoe"]
    pool = make_pool(text_root["gpt2"])
    for method, res in runs.items():
        assert set(res["per_task"]) == set(TASKS) and all(0.0 <= a <= 1.0 for a in res["per_task"].values())
        assert res["method_info"]["trainable_parameters"] > 0 and "routing_mean" in res["method_info"]
        run = next(d for d in (tmp_path / "routed").iterdir() if (d / "results.json").is_file()
                   and json.loads((d / "results.json").read_text())["method"] == method)
        routing = json.loads((run / "routing.json").read_text())
        assert routing["tasks"] == list(TASKS) and len(routing["mean_routing_weight"]) == len(TASKS)
        assert (run / "routing.png").stat().st_size > 1000
        spec = json.loads((run / "routed_model" / "routed_config.json").read_text())
        assert spec["kwargs"]["mlp_pattern"] == GPT2_MLP and spec["blocks"] == ["body.h.0.mlp", "body.h.1.mlp"]
        rebuilt = read_routed(run / "routed_model", pool.encoder, pool.task_vectors())
        assert all(b.linears == ["c_fc", "c_proj"] for b in rebuilt.blocks().values())
