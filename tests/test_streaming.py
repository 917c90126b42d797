"""Out-of-core static merging of HF checkpoint directories and LoRA adapters (fusion/stream.py).

Tiny random GPT-2 and Llama models built without the hub, experts as seeded perturbations saved in small shards;
the streamed merge must equal the in-memory merge (task vectors of whole state dicts → the same fn) exactly.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

from fusion.errors import ConfigError, DownloadUnavailableError, MissingFileError  # noqa: E402
from fusion.merge.combine import task_arithmetic  # noqa: E402
from fusion.merge.consensus import consensus_merge  # noqa: E402
from fusion.merge.family import dare, della  # noqa: E402
from fusion.merge.iso import iso_c, iso_cts  # noqa: E402
from fusion.merge.magmax import magmax  # noqa: E402
from fusion.merge.order_statistic import (high_histogram, low_histogram, select_bucket,  # noqa: E402
                                          threshold_from_buckets)
from fusion.merge.pcb import pcb  # noqa: E402
from fusion.merge.task_vectors import PoolMismatchError, add_delta, stack_task_vectors  # noqa: E402
from fusion.merge.ties import ties  # noqa: E402
from fusion.merge.tsv import tsv_m  # noqa: E402
from fusion.merge.wudi import wudi  # noqa: E402
from fusion.pools.hf_checkpoint import resolve_checkpoint  # noqa: E402
from fusion.pools.lora_adapter import LoRAExpert  # noqa: E402
from fusion.report import sharded_safetensors  # noqa: E402
from fusion.stream import stream_merge  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARD = "20KB"


def gpt2_model(vocab: int = 64) -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=1,
                                     eos_token_id=2)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def llama_model() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def save(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path, max_shard_size=SHARD)
    model.generation_config.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pool(request, tmp_path_factory):
    """``(base dir, [3 expert dirs], builder)`` for a tiny sharded model."""
    build = gpt2_model if request.param == "gpt2" else llama_model
    root = tmp_path_factory.mktemp(request.param)
    base = save(build(), root / "base")
    experts = [save(perturbed(build(), seed), root / f"expert{seed}") for seed in (1, 2, 3)]
    return base, experts, build


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    """A whole checkpoint in memory, with safetensors' own loader (independent of fusion's reader)."""
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    state = {}
    for file in files:
        state.update(load_file(str(directory / file)))
    return dict(sorted(state.items()))


def in_memory(fn, base: Path, experts: list[Path]) -> dict[str, torch.Tensor]:
    """The in-memory merge: stack the task vectors of whole state dicts (sorted names) and call ``fn`` once."""
    theta0 = load_state(base)
    tv = stack_task_vectors({n: t.float() for n, t in theta0.items()},
                            [{n: t.float() for n, t in load_state(e).items()} for e in experts])
    return add_delta(theta0, fn(tv))


METHODS = {
    "task_arithmetic": partial(task_arithmetic, lam=0.3),
    "ties": partial(ties, k=0.2, lam=0.3),
    "ties_mean": partial(ties, k=0.05, lam=1.0, aggregate="mean"),
    "magmax": partial(magmax, lam=1.0),
    "tsv_m": partial(tsv_m, alpha=1.0),
    "dare": partial(dare, p=0.5, lam=0.3, seed=3),
    "dare_ties": partial(dare, p=0.3, lam=0.5, consensus=True, k=0.2, seed=4),
    "della": partial(della, density=0.5, epsilon=0.1, seed=5),
    "iso_c": partial(iso_c, alpha=1.5),
    "iso_cts": partial(iso_cts, alpha=1.5),
    "wudi": partial(wudi, solver="closed_form", ridge=1e-3, others="mean", linear=("c_fc.weight", "q_proj.weight")),
    "consensus": partial(consensus_merge, k=2, lam=0.3),
}


def transposed_for(fn, which, tv):
    """``fn`` applied with the tensors ``which`` selects transposed (``[K, a, b] -> [K, b, a]``) and back."""
    flipped = fn({n: t.transpose(1, 2) if which(n) else t for n, t in tv.items()})
    return {n: d.T if which(n) else d for n, d in flipped.items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_streamed_merge_equals_in_memory_merge_exactly(pool, method, tmp_path):
    base, experts, _ = pool
    out = stream_merge(METHODS[method], base, experts, tmp_path / "merged", max_shard_size=SHARD)
    fn = METHODS[method]
    if method == "wudi" and "gpt2" in str(base):  # WUDI on GPT-2's Conv1D [in, out] weights: solved as [out, in]
        fn = partial(transposed_for, fn, lambda name: name.endswith("mlp.c_fc.weight"))
    streamed, expected = load_state(out), in_memory(fn, base, experts)
    assert list(streamed) == list(expected)
    for name in expected:
        assert torch.equal(streamed[name], expected[name]), (method, name)
    assert not torch.equal(streamed[sorted(streamed)[-1]], load_state(base)[sorted(streamed)[-1]])


def test_global_trim_differs_from_a_per_tensor_trim(pool, tmp_path):
    """TIES' trim is over the whole model: trimming each tensor on its own gives another merge."""
    base, experts, _ = pool
    streamed = load_state(stream_merge(METHODS["ties"], base, experts, tmp_path / "m", max_shard_size=SHARD))
    theta0 = load_state(base)
    per_tensor = {}
    for name, t in theta0.items():
        tv = stack_task_vectors({name: t}, [{name: load_state(e)[name]} for e in experts])
        per_tensor.update(add_delta({name: t}, ties(tv, k=0.2, lam=0.3)))
    assert any(not torch.equal(streamed[n], per_tensor[n]) for n in theta0)


def word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(60)} | {"[UNK]": 60}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_output_is_sharded_and_reloads_to_identical_logits(pool, tmp_path):
    base, experts, build = pool
    with_tokenizer = tmp_path / "base"
    shutil.copytree(base, with_tokenizer)
    word_tokenizer().save_pretrained(with_tokenizer)
    out = stream_merge(METHODS["ties"], with_tokenizer, experts, tmp_path / "merged", max_shard_size=SHARD)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert transformers.AutoTokenizer.from_pretrained(out)("w3 w7")["input_ids"] == [3, 7]
    reference = build()
    reference.load_state_dict(in_memory(METHODS["ties"], base, experts), strict=False)
    reference.tie_weights()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
        assert not torch.equal(loaded(ids).logits, build()(ids).logits)


def test_kth_largest_by_radix_select_equals_topk():
    torch.manual_seed(0)
    parts = [torch.randn(3, 40, 7) * 1e-3, torch.randn(3, 100), torch.zeros(3, 50), torch.randn(3, 5).round()]
    parts[1][0, :30] = 0.5  # many ties
    flat = torch.cat([p.reshape(3, -1) for p in parts], 1)
    for n in (1, 2, 17, 100, 331, flat.shape[1]):
        bucket, rank = select_bucket(sum(high_histogram(p) for p in parts), n)
        low, _ = select_bucket(sum(low_histogram(p, bucket) for p in parts), rank)
        expected = torch.topk(flat.abs().float(), n, dim=1).values[:, -1]
        assert torch.equal(threshold_from_buckets(bucket, low), expected), n


def lora_adapter(model: torch.nn.Module, path: Path, **config) -> tuple[Path, torch.nn.Module]:
    """A peft LoRA adapter with random (non-zero) B saved to ``path``; returns it and the merged dense model."""
    torch.manual_seed(7)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **config))
    wrapped.save_pretrained(path)
    return path, wrapped.merge_and_unload()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_task_vector_equals_dense_difference_of_merged_weights(arch, tmp_path):
    build = gpt2_model if arch == "gpt2" else llama_model
    base = save(build(), tmp_path / "base")
    config = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True) if arch == "gpt2" \
        else dict(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"], use_rslora=True,
                  rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3})
    adapter, merged = lora_adapter(build(), tmp_path / "adapter", **config)
    expert, theta0 = LoRAExpert(adapter), load_state(base)
    dense = merged.state_dict()
    targets = 0
    for name, t in theta0.items():
        tau = expert.task_vector(name, t)
        torch.testing.assert_close(tau, dense[name] - t, rtol=0, atol=1e-6)
        targets += bool(tau.abs().sum() > 0)
    assert targets == 4


def test_streamed_merge_with_a_lora_expert_equals_in_memory(tmp_path):
    base = save(gpt2_model(), tmp_path / "base")
    adapter, merged = lora_adapter(gpt2_model(), tmp_path / "adapter", r=2, lora_alpha=4,
                                   target_modules=["c_attn"], fan_in_fan_out=True)
    full = save(perturbed(gpt2_model(), 1), tmp_path / "full")
    out = load_state(stream_merge(METHODS["task_arithmetic"], base, [adapter, full], tmp_path / "m",
                                  max_shard_size=SHARD))
    theta0 = load_state(base)
    lora_tau = {n: LoRAExpert(adapter).task_vector(n, t) for n, t in theta0.items()}
    tv = {n: torch.stack([lora_tau[n], load_state(full)[n] - t]) for n, t in theta0.items()}
    expected = add_delta(theta0, task_arithmetic(tv, lam=0.3))
    assert all(torch.equal(out[n], expected[n]) for n in theta0)


def test_expert_with_added_tokens_is_one_message_with_both_shapes_and_the_fix(tmp_path):
    base = save(gpt2_model(), tmp_path / "base")
    bigger = gpt2_model()
    bigger.resize_token_embeddings(72)
    expert = save(bigger, tmp_path / "expert")
    with pytest.raises(PoolMismatchError, match=r"transformer\.wte\.weight.*\(72, 16\).*\(64, 16\).*"
                                                r"resize_token_embeddings\(72\)"):
        stream_merge(METHODS["ties"], base, [expert], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_mismatched_architecture_missing_shard_and_nan_are_clear_errors(tmp_path):
    base = save(gpt2_model(), tmp_path / "base")
    llama = save(llama_model(), tmp_path / "llama")
    with pytest.raises(PoolMismatchError, match=r"model_type='llama'.*model_type='gpt2'"):
        stream_merge(METHODS["ties"], base, [llama], tmp_path / "m")
    broken = save(perturbed(gpt2_model(), 1), tmp_path / "broken")
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(MissingFileError, match=shard.name):
        stream_merge(METHODS["ties"], base, [broken], tmp_path / "m")
    lacking = tmp_path / "lacking"
    shutil.copytree(base, lacking)
    for shard in sorted(lacking.glob("model-*.safetensors")):
        state = load_file(str(shard))
        if "transformer.ln_f.bias" in state:
            del state["transformer.ln_f.bias"]
            save_file(state, str(shard), metadata={"format": "pt"})
            index = json.loads((lacking / "model.safetensors.index.json").read_text())
            del index["weight_map"]["transformer.ln_f.bias"]
            (lacking / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PoolMismatchError, match=r"key 'transformer\.ln_f\.bias' is missing from expert .*lacking"):
        stream_merge(METHODS["ties"], base, [lacking], tmp_path / "m")
    nan = gpt2_model()
    with torch.no_grad():
        nan.transformer.h[1].mlp.c_fc.bias[3] = float("nan")
    nan_dir = save(nan, tmp_path / "nan")
    with pytest.raises(PoolMismatchError, match=r"transformer\.h\.1\.mlp\.c_fc\.bias.*non-finite"):
        stream_merge(METHODS["task_arithmetic"], base, [nan_dir], tmp_path / "m")
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.partial-*"))


def test_an_interrupted_write_leaves_no_output(tmp_path, monkeypatch):
    base = save(gpt2_model(), tmp_path / "base")
    expert = save(perturbed(gpt2_model(), 1), tmp_path / "expert")
    original, calls = sharded_safetensors.ShardedWriter.write, []

    def failing(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        original(self, name, tensor)

    monkeypatch.setattr(sharded_safetensors.ShardedWriter, "write", failing)
    with pytest.raises(KeyboardInterrupt):
        stream_merge(METHODS["task_arithmetic"], base, [expert], tmp_path / "m", max_shard_size=SHARD)
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.partial-*"))


def test_hub_name_offline_fails_fast_with_what_to_download(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DownloadUnavailableError, match=r"huggingface-cli download no-org/no-model --local-dir"):
        resolve_checkpoint("no-org/no-model")
    assert time.perf_counter() - start < 10
    with pytest.raises(MissingFileError, match="not a directory"):
        resolve_checkpoint("./no/such/dir")


def test_methods_that_do_not_stream_are_refused(tmp_path):
    base = save(gpt2_model(), tmp_path / "base")
    with pytest.raises(ConfigError, match=r"pcb.*cannot be merged tensor by tensor"):
        stream_merge(partial(pcb), base, [base], tmp_path / "m")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", "from fusion.stream_app import main; main()", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_cli_merges_with_the_method_config_and_reports_user_errors(tmp_path):
    base = save(gpt2_model(), tmp_path / "base")
    experts = [save(perturbed(gpt2_model(), s), tmp_path / f"e{s}") for s in (1, 2)]
    done = run_cli("method=ties", f"base={base}", f"experts=[{experts[0]},{experts[1]}]",
                   f"output={tmp_path / 'out'}", "max_shard_size=20KB", "method.fn.k=0.1")
    assert done.returncode == 0, done.stderr
    assert "tune grid" in done.stdout + done.stderr
    expected = in_memory(partial(ties, k=0.1, lam=0.3), base, experts)
    assert all(torch.equal(t, expected[n]) for n, t in load_state(tmp_path / "out").items())
    failed = run_cli("method=regmean", f"base={base}", f"experts=[{experts[0]}]", f"output={tmp_path / 'x'}")
    assert failed.returncode == 2 and "not a data-free static merge" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_cuda_streams_the_math_to_the_gpu(tmp_path):
    """``device=cuda``: the same merge with the math on the GPU (the trim threshold is exact on either device)."""
    base = save(gpt2_model(), tmp_path / "base")
    experts = [save(perturbed(gpt2_model(), s), tmp_path / f"e{s}") for s in (1, 2)]
    cpu = load_state(stream_merge(METHODS["ties"], base, experts, tmp_path / "cpu"))
    gpu = load_state(stream_merge(METHODS["ties"], base, experts, tmp_path / "gpu", device="cuda"))
    for name, t in cpu.items():
        torch.testing.assert_close(gpu[name], t, rtol=1e-5, atol=1e-6)


def test_benchmark_modes_write_identical_merges(tmp_path):
    """benchmarks/streamed_merge.py at a tiny size, K = 2, its two modes in this process (the script runs each in
    a subprocess for its own peak RSS)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import streamed_merge

    base, experts = streamed_merge.generate(tmp_path / "cache", "tiny", 2)
    for mode in ("streamed", "in_memory"):
        report = streamed_merge.child(mode, base, experts, tmp_path / mode, threads=1)
        assert report["peak_rss_mib"] >= report["baseline_mib"] > 0 and report["time_s"] > 0
    assert streamed_merge.identical(tmp_path / "streamed", tmp_path / "in_memory")
    assert not streamed_merge.identical(tmp_path / "streamed", base)
