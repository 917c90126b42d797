"""Causal language models and instruction task pools through the one runner (issue 19, items 1 and 5): a tiny random
Llama (hidden 16, 2 layers) saved with save_pretrained next to a tiny WordLevel tokenizer with eos and pad, experts
as seeded perturbations of every weight, LoRA experts made with peft, fixture prompt/completion datasets on disk."""
from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusion.data.contract import check_task_pool
from fusion.errors import ConfigError
from fusion.merge.task_vectors import PoolMismatchError
from fusion.pools.causal_inputs import COMPLETION, IGNORE_INDEX, PROMPT, next_token_labels
from fusion.pools.contract import check_model_pool
from fusion.train.objectives import cross_entropy, entropy, token_rows
from tests.test_text_backbone import REPO, WORDS, results

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

TASKS = ("echo", "qa")
SPECIALS = ["<pad>", "<unk>", "<eos>"]
PAD, EOS = 0, 2
ATOL = 1e-5  # float32 logits of the same computation in two module trees


def build_tokenizer(directory: Path):
    """A WordLevel tokenizer over :data:`WORDS` (``<pad>`` = 0, ``<unk>`` = 1, ``<eos>`` = 2), no added tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(str(directory))
    return fast


def llama_config(tied: bool, vocab: int = len(SPECIALS) + len(WORDS)):
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64,
                                    tie_word_embeddings=tied, pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS)


def perturbed(model, seed: int, scale: float = 0.1):
    """``model`` with seeded noise of relative size ``scale`` on every parameter (a tied tensor once)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.abs().mean() * torch.randn_like(p))
    return model


def finetuned(model, tokenizer, data: Path, task: str, steps: int = 40):
    """``model`` after ``steps`` Adam steps of completion cross-entropy on ``task``'s train split (so that an
    expert's accuracy differs from the pretrained model's and merges differ from both)."""
    from datasets import load_from_disk

    from fusion.data.instruction_tasks import tokenize_instructions

    train = load_from_disk(str(data / task))["train"]
    prompt = train["prompt"] if task == "echo" else [f"{c} is {q}" for c, q in zip(train["context"], train["question"])]
    x, y, _ = tokenize_instructions(prompt, train["completion" if task == "echo" else "answer"], tokenizer, 12)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        logits = model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits
        cross_entropy(*token_rows(logits, y, x, labeled=True)).backward()
        opt.step()
    return model.eval()


def build_models(root: Path, data: Path, tied: bool) -> dict[str, Path]:
    """``{"base": dir, task: dir}``: a random tiny Llama and one expert per task (every weight perturbed, seeded,
    then briefly fine-tuned on the task), tokenizer alongside."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tokenizer = build_tokenizer(root / "tok")
    dirs = {"base": root / "base"}
    base = AutoModelForCausalLM.from_config(llama_config(tied))
    base.save_pretrained(str(dirs["base"]))
    tokenizer.save_pretrained(str(dirs["base"]))
    for i, task in enumerate(TASKS):
        expert = perturbed(AutoModelForCausalLM.from_pretrained(str(dirs["base"])), seed=1 + i)
        dirs[task] = root / task
        finetuned(expert, tokenizer, data, task).save_pretrained(str(dirs[task]))
    return dirs


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def build_data(root: Path, n_train: int = 30, n_test: int = 12) -> Path:
    """``root/echo`` (columns prompt/completion) and ``root/qa`` (question/context/answer, read with a template)."""
    from datasets import Dataset, DatasetDict

    rng = random.Random(0)

    def split(task: str, n: int) -> Dataset:
        if task == "echo":
            return Dataset.from_dict({"prompt": [words(rng, 2, 5) for _ in range(n)],
                                      "completion": [words(rng, 1, 3) for _ in range(n)]})
        return Dataset.from_dict({"question": [words(rng, 1, 3) for _ in range(n)],
                                  "context": [words(rng, 1, 3) for _ in range(n)],
                                  "answer": [words(rng, 1, 2) for _ in range(n)]})

    for task in TASKS:
        DatasetDict({"train": split(task, n_train), "test": split(task, n_test)}).save_to_disk(str(root / task))
    return root


QA = {"template": "{context} is {question}", "completion_column": "answer"}


@pytest.fixture(scope="module")
def lm_root(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("causal")
    data = build_data(root / "data")
    return {"data": data, "tied": build_models(root / "tied", data, True),
            "untied": build_models(root / "untied", data, False), "root": root}


def make_pool(dirs: dict, experts: dict | None = None):
    from fusion.pools.hf_causal_lm import hf_causal_lm_pool

    return hf_causal_lm_pool(str(dirs["base"]), experts or {t: str(dirs[t]) for t in TASKS}, name="tiny_llama")


def make_taskpool(root: dict, kind: str = "tied", max_length: int = 12, cache: Path | None = None, **extra):
    from fusion.data.instruction_tasks import instruction_taskpool

    return instruction_taskpool(list(TASKS), str(root[kind]["base"]), max_length,
                                overrides={"qa": QA, **extra.pop("overrides", {})}, data_root=str(root["data"]),
                                token_cache=str(cache or root["root"] / "tokens"), **extra)


def hf_logits(directory: Path, x: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        return model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits


# ---- the adapter and the rows objectives read --------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_encoder_logits_equal_the_transformers_models_own(lm_root, kind):
    pool = check_model_pool(make_pool(lm_root[kind]), "tiny")
    taskpool = check_task_pool(make_taskpool(lm_root, kind), "tiny")
    vocab = len(SPECIALS) + len(WORDS)
    for task in TASKS:
        x, y = taskpool.dataset(task, "test").batch(torch.arange(6))
        assert x.shape == (6, 3, 12) and y.shape == (6, 12) and x.dtype == y.dtype == torch.int64
        assert bool((x[:, 1] == 0).any()) and bool((x[:, 2] == COMPLETION).any())
        got = pool.heads(pool.expert_encoder(task)(x), task)
        want = hf_logits(lm_root[kind][task], x)
        assert got.shape == (6, 12, vocab) and pool.heads.num_classes(task) == vocab
        assert torch.allclose(got, want, atol=ATOL), (kind, task, (got - want).abs().max())
        assert not torch.allclose(pool.heads(pool.encoder(x), task), want, atol=1e-3)  # θ0 is not the expert
    with pytest.raises(ValueError, match=r"packed tokens \[B, 3, T\].*instruction task pool"):
        pool.encoder(torch.zeros(2, 2, 8, dtype=torch.long))


def test_token_rows_select_the_hand_computed_rows():
    # example 0: prompt [5, 6], completion [7, eos]; example 1: prompt [5, 6, 7], completion [eos]; T = 5
    ids = torch.tensor([[5, 6, 7, EOS, PAD], [5, 6, 7, EOS, PAD]])
    role = torch.tensor([[PROMPT, PROMPT, COMPLETION, COMPLETION, 0], [PROMPT, PROMPT, PROMPT, COMPLETION, 0]])
    x = torch.stack([ids, (role > 0).long(), role], dim=1)
    labels = next_token_labels(x)
    m = IGNORE_INDEX
    assert labels.tolist() == [[m, 7, EOS, m, m], [m, m, EOS, m, m]]
    logits = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5, 1).expand(2, 5, 3)  # row (b, t) holds 5b + t
    rows, target = token_rows(logits, labels, x, labeled=True)
    assert rows[:, 0].tolist() == [1, 2, 7] and target.tolist() == [7, EOS, EOS]
    rows, target = token_rows(logits, labels, x, labeled=False)
    assert rows[:, 0].tolist() == [0, 1, 5, 6, 7] and target is None
    flat, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    got = token_rows(flat, y, torch.zeros(4, 3, 8, 8), labeled=True)
    assert got[0] is flat and got[1] is y  # classification logits pass through unchanged


def test_label_free_rows_never_read_a_completion_token(lm_root):
    pool, taskpool = make_pool(lm_root["tied"]), make_taskpool(lm_root)
    x, y = taskpool.dataset("echo", "test").batch(torch.arange(8))
    changed = x.clone()
    completion = changed[:, 2] == COMPLETION
    changed[:, 0][completion] = (changed[:, 0][completion] + 1 - 3) % len(WORDS) + 3  # other words, same roles
    model = pool.expert_encoder("echo")
    before, after = model(x), model(changed)
    free_before, _ = token_rows(before, None, x, labeled=False)
    free_after, _ = token_rows(after, None, changed, labeled=False)
    assert torch.equal(free_before, free_after) and float(entropy(free_before)) == float(entropy(free_after))
    ce_before = cross_entropy(*token_rows(before, y, x, labeled=True))
    ce_after = cross_entropy(*token_rows(after, next_token_labels(changed), changed, labeled=True))
    assert abs(float(ce_before) - float(ce_after)) > 1e-3


def test_evaluation_accuracy_is_next_token_accuracy_on_completion_tokens(lm_root):
    from fusion.evaluate import evaluate

    pool, taskpool = make_pool(lm_root["tied"]), make_taskpool(lm_root)
    encoders = {t: pool.expert_encoder(t) for t in TASKS}
    got = evaluate(encoders, pool.heads, taskpool, batch_size=5)
    for task in TASKS:
        data = taskpool.dataset(task, "test")
        x = data.inputs
        logits = hf_logits(lm_root["tied"][task], x)
        correct = total = 0
        for b in range(len(x)):
            for t in range(x.shape[2] - 1):
                if x[b, 2, t + 1] == COMPLETION:
                    correct += int(logits[b, t].argmax() == x[b, 0, t + 1])
                    total += 1
        assert total > len(x) and got[task] == pytest.approx(correct / total, abs=1e-6), task
    pretrained = evaluate(pool.encoder, pool.heads, taskpool, batch_size=5)
    assert all(got[t] > pretrained[t] + 0.1 for t in TASKS), (got, pretrained)  # the experts learned their task


def test_fisher_fw_merging_and_diagnostics_read_the_rows_of_token_rows(lm_root):
    from fusion.merge.fisher import diagonal_fisher
    from fusion.methods.data_merges import fisher_of
    from fusion.methods.frank_wolfe import objective_gradient
    from fusion.pools.diagnostics import predictions
    from fusion.train.objectives import CrossEntropy

    pool, taskpool = make_pool(lm_root["tied"]), make_taskpool(lm_root)
    model, (x, y) = pool.expert_encoder("echo"), taskpool.dataset("echo", "train").batch(torch.arange(4))
    params = dict(model.named_parameters())
    forward = lambda m, inputs: token_rows(pool.heads(m(inputs), "echo"), None, inputs, labeled=False)[0]  # noqa: E731
    got = fisher_of(model, params, forward, [x[:2], x[2:]], seed=0)
    sampler, want = torch.Generator().manual_seed(0), {n: torch.zeros_like(p) for n, p in params.items()}
    for batch in (x[:2], x[2:]):  # independent: per example, ∇ Σ_r log p(y_r) over its prompt rows, y_r sampled
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(forward(model, batch), -1).double(), 1, generator=sampler)[:, 0]
        start = 0
        for example in batch:
            leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
            logits = torch.func.functional_call(model, leaves, (example[None],))
            rows = token_rows(logits, None, example[None], labeled=False)[0]
            picked = sampled[start:start + len(rows), None]
            grads = torch.autograd.grad(torch.log_softmax(rows, -1).gather(1, picked).sum(), list(leaves.values()))
            start += len(rows)
            for n, g in zip(params, grads):
                want[n] += g.pow(2) / len(x)
    assert all(torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-7) for n in params)
    assert all(torch.equal(got[n], v) for n, v in diagonal_fisher(model, params, forward, [x[:2], x[2:]],
                                                                   seed=0, vectorize=False).items())
    theta0 = pool.pretrained_state()
    gradient = objective_gradient(pool.encoder, pool.heads, theta0, {"echo": [(x, y)]}, CrossEntropy())
    leaves = {n: t.clone().requires_grad_() for n, t in theta0.items()}
    logits = torch.func.functional_call(pool.encoder, leaves, (x,))
    cross_entropy(*token_rows(logits, y, x, labeled=True)).backward()
    fw = gradient({n: torch.zeros_like(t) for n, t in theta0.items()})
    assert all(torch.allclose(fw[n], leaves[n].grad, atol=1e-6) for n in theta0)
    rows, labels = predictions(model, pool.heads, taskpool.dataset("echo", "test"), "echo", batch_size=5)
    assert rows.shape == (int((taskpool.dataset("echo", "test").labels != IGNORE_INDEX).sum()), pool.heads.vocab_size)
    assert torch.equal(labels, taskpool.dataset("echo", "test").labels[taskpool.dataset("echo", "test").labels != -100])


# ---- tied embeddings, bad experts, LoRA ---------------------------------------------------------------------------

def test_tied_embeddings_once_in_the_task_vectors_and_kept_tied_in_merges(lm_root):
    from fusion.methods.static import merged_encoder

    embed, head = "model.model.embed_tokens.weight", "model.lm_head.weight"
    for kind, tied in (("tied", True), ("untied", False)):
        pool = make_pool(lm_root[kind])
        tv = pool.task_vectors()
        params = dict(pool.encoder.named_parameters())  # a tied tensor once
        assert set(tv) == set(params) and embed in tv and (head in tv) is not tied
        assert pool.manifest["tied"] == ([head] if tied else [])
        delta = {n: 0.3 * t.sum(0) for n, t in tv.items()}
        merged = merged_encoder(pool, delta)
        model = merged.model
        assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
        want = pool.pretrained_state()[embed] + delta[embed]
        assert torch.equal(model.model.embed_tokens.weight, want)
        if tied:
            assert torch.equal(model.lm_head.weight, want)


def test_vocabulary_and_architecture_mismatches_are_clear_errors(lm_root, tmp_path):
    from transformers import AutoModelForCausalLM

    from fusion.pools.hf_causal_lm import hf_causal_lm_pool

    dirs = lm_root["untied"]
    bigger = AutoModelForCausalLM.from_pretrained(str(dirs["echo"]))
    bigger.resize_token_embeddings(bigger.config.vocab_size + 3)  # an expert with added tokens
    bigger.save_pretrained(str(tmp_path / "added"))
    with pytest.raises(PoolMismatchError, match=r"'model.model.embed_tokens.weight' has shape \(30, 16\).*\(27, 16\)"
                                                 r".*vocabularies differ.*resize_token_embeddings\(30\)"):
        hf_causal_lm_pool(str(dirs["base"]), {"echo": str(tmp_path / "added")})
    with pytest.raises(PoolMismatchError, match="'model.lm_head.weight' is not in the base but in expert"):
        hf_causal_lm_pool(str(lm_root["tied"]["base"]), {"echo": str(dirs["echo"])})  # untied expert of a tied base
    with pytest.raises(ConfigError, match=r"modelpool.tasks \['math'\]"):
        hf_causal_lm_pool(str(dirs["base"]), {"echo": str(dirs["echo"])}, tasks=["math"])


def test_a_lora_expert_equals_peft_merge_and_unload(lm_root, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = lm_root["tied"]
    torch.manual_seed(3)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(dirs["base"])), config)
    peft_model.save_pretrained(str(tmp_path / "lora"))
    want = peft_model.merge_and_unload().state_dict()
    pool = make_pool(dirs, {"echo": str(dirs["echo"]), "lora": str(tmp_path / "lora")})
    got = pool.experts["lora"]
    assert set(got) == set(pool.pretrained_state())
    for key, value in got.items():
        assert torch.allclose(value, want[key.removeprefix("model.")], atol=1e-6), key
    moved = [k for k, v in pool.task_vectors().items() if bool(v[1].abs().max() > 0)]
    assert moved and all(any(m in k for m in ("q_proj", "v_proj", "up_proj")) for k in moved)


# ---- the instruction task pool -------------------------------------------------------------------------------------

def test_instruction_pool_tokenises_truncates_drops_and_caches(lm_root, tmp_path, monkeypatch, caplog):
    import fusion.data.instruction_tasks as instruction_tasks
    from fusion.data.hf_tasks import DatasetSpecError
    from fusion.data.taskpool import EmptyDatasetError

    calls = []
    real = instruction_tasks.tokenize_instructions
    monkeypatch.setattr(instruction_tasks, "tokenize_instructions", lambda *a: calls.append(a[3]) or real(*a))
    pool = make_taskpool(lm_root, cache=tmp_path)
    data = pool._split("qa", "test")
    first = pool.dataset("qa", "test")
    row = data[0]
    prompt = f"{row['context']} is {row['question']}".split()
    completion = row["answer"].split()
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    ids = [vocab[w] for w in prompt + completion] + [EOS]
    assert first.inputs[0, 0, :len(ids)].tolist() == ids and first.inputs[0, 0, len(ids):].eq(PAD).all()
    assert first.inputs[0, 2, :len(ids)].tolist() == [PROMPT] * len(prompt) + [COMPLETION] * (len(completion) + 1)
    again = make_taskpool(lm_root, cache=tmp_path).dataset("qa", "test")  # a fresh pool: from disk
    assert calls == [12] and torch.equal(first.inputs, again.inputs) and torch.equal(first.labels, again.labels)
    assert {s: len(pool.dataset("echo", s)) for s in ("train", "val", "test")} == {"train": 27, "val": 3, "test": 12}
    assert pool.classnames("qa") == () and pool.templates("qa") == (QA["template"],)
    assert pool.templates("echo") == ("{prompt}",) and pool.select(["qa"]).tasks == ["qa"]
    short = make_taskpool(lm_root, max_length=5, cache=tmp_path)  # echo prompts have 2-5 words
    with caplog.at_level(logging.WARNING):
        cut = short.dataset("echo", "test")
    assert "dropped, their prompt alone fills taskpool.max_length=5" in caplog.text
    assert 0 < len(cut) < 12 and bool((cut.inputs[:, 2, -1] == COMPLETION).any())  # completions cut at 5 tokens
    with pytest.raises(EmptyDatasetError, match="taskpool.max_length=2"):
        make_taskpool(lm_root, max_length=2, cache=tmp_path).dataset("echo", "test")
    bad = make_taskpool(lm_root, cache=tmp_path, overrides={"echo": {"completion_column": "answer"}})
    with pytest.raises(DatasetSpecError, match="no column 'answer'.*'prompt'.*overrides.echo.completion_column"):
        bad.dataset("echo", "test")
    with pytest.raises(ConfigError, match="unknown keys.*'label_column'"):
        make_taskpool(lm_root, overrides={"echo": {"label_column": "x"}})


# ---- the exported merge generates ---------------------------------------------------------------------------------

def greedy(encoder, prompt: list[int], steps: int) -> list[int]:
    """The argmax continuation of ``prompt`` read from ``encoder``'s logits, stopping after eos."""
    ids = list(prompt)
    for _ in range(steps):
        x = torch.tensor([ids, [1] * len(ids), [PROMPT] * len(ids)])[None]
        ids.append(int(encoder(x)[0, -1].argmax()))
        if ids[-1] == EOS:
            break
    return ids[len(prompt):]


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_the_exported_merged_model_generates_its_argmax_continuation(lm_root, kind, tmp_path):
    from transformers import AutoModelForCausalLM

    from fusion.methods.static import merged_encoder

    pool = make_pool(lm_root[kind])
    merged = merged_encoder(pool, {n: 0.5 * t.sum(0) for n, t in pool.task_vectors().items()})
    assert pool.exporter(merged.state_dict(), tmp_path / "merged") == {"model": str(tmp_path / "merged")}
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is (kind == "tied")
    prompt = [3, 9, 12, 4]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                             max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
        want = greedy(merged, prompt, 6)
    assert out[0, len(prompt):].tolist() == want and len(want) > 0


def test_gpt2_lm_exports_its_conv1d_layers_back(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    from fusion.methods.static import merged_encoder
    from fusion.pools.hf_causal_lm import hf_causal_lm_pool

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(SPECIALS) + len(WORDS), n_positions=32, n_embd=16, n_layer=2, n_head=2,
                        pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS)
    build_tokenizer(tmp_path / "base")
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "base"))
    expert = perturbed(AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")), seed=1)
    expert.save_pretrained(str(tmp_path / "echo"))
    pool = hf_causal_lm_pool(str(tmp_path / "base"), {"echo": str(tmp_path / "echo")})
    assert pool.mlp_pattern == r"(^|\.)h\.\d+\.mlp$"
    assert pool.pretrained_state()["model.transformer.h.0.mlp.c_fc.weight"].shape == (64, 16)  # nn.Linear [out, in]
    x = torch.tensor([[[3, 9, 12, 4], [1, 1, 1, 1], [PROMPT] * 4]])
    assert torch.allclose(pool.expert_encoder("echo")(x), hf_logits(tmp_path / "echo", x), atol=ATOL)
    merged = merged_encoder(pool, {n: 0.5 * t.sum(0) for n, t in pool.task_vectors().items()})
    pool.exporter(merged.state_dict(), tmp_path / "merged")  # export_model=true
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert torch.allclose(merged(x), hf_logits(tmp_path / "merged", x), atol=ATOL)
    with torch.no_grad():
        out = model.generate(x[:, 0], attention_mask=x[:, 1], max_new_tokens=5, do_sample=False, pad_token_id=PAD)
    assert out[0, 4:].tolist() == greedy(merged, x[0, 0].tolist(), 5)


# ---- end to end through the CLI -----------------------------------------------------------------------------------

def cli(root: dict, methods: list[str], out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python -m fusion.app -m method=...`` on the tiny Llama pool and the instruction task pool."""
    experts = ",".join(f"{t}:'{root['tied'][t]}'" for t in TASKS)
    cmd = [sys.executable, "-m", "fusion.app", "-m", f"method={','.join(methods)}", "modelpool=hf_causal_lm",
           f"modelpool.base={root['tied']['base']}", f"modelpool.experts={{{experts}}}", "taskpool=instructions",
           f"taskpool.data_root={root['data']}", "taskpool.max_length=12",
           "+taskpool.overrides.qa.template='{context} is {question}'",
           "+taskpool.overrides.qa.completion_column=answer",
           "trainer.fast_dev_run=2", "trainer.enable_progress_bar=false", "logger=none", "print_table=false",
           "num_threads=1", "eval_batch_size=16", "checkpoint_every=0",
           f"hydra.sweep.dir={out}", "hydra.sweep.subdir=${hydra.job.num}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "FUSION_CACHE": str(root["root"] / "cache"), "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, env=env, cwd=out.parent, text=True, capture_output=True, timeout=900)


def test_supervised_adamerging_trains_on_completion_tokens_of_the_labeled_val_split(lm_root, tmp_path):
    """Every method's run on this pool: tests/test_text_methods.py; here the labeled objective."""
    supervised = cli(lm_root, ["adamerging_layer_wise"], tmp_path / "supervised", "method/objective=cross_entropy",
                     "method/data=val_labeled")
    assert supervised.returncode == 0, supervised.stderr[-4000:]
    res = results(tmp_path / "supervised")["adamerging_layer_wise"]
    assert set(res["per_task"]) == set(TASKS) and res["modelpool"] == "hf_causal_lm"
    assert res["per_task"] != res["reference"]["pretrained"]["per_task"]
    assert "cross_entropy" in res["protocol"] and "val" in res["protocol"]


def test_an_undeclared_model_type_is_one_message_naming_the_supported_ones(tmp_path):
    from transformers import AutoModelForCausalLM, GPTNeoConfig

    from fusion.pools.hf_causal_lm import hf_causal_lm_pool

    config = GPTNeoConfig(vocab_size=32, max_position_embeddings=16, hidden_size=8, num_layers=1, num_heads=2,
                          attention_types=[[["global"], 1]])
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "neo"))
    with pytest.raises(ConfigError, match=r"neo: model_type='gpt_neo' has no causal-LM adapter; supported: \['gpt2', "
                                          r"'llama', .*declare one: fusion.pools.hf_causal_lm.CAUSAL_ADAPTERS"):
        hf_causal_lm_pool(str(tmp_path / "neo"), {"echo": str(tmp_path / "neo")})
