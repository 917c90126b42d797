"""Text-to-text (T5 / Flan-T5) backbones through the one runner (issue 19, item 1): tiny random T5s saved with
save_pretrained next to a tiny WordLevel tokenizer — v1.0-shaped (ReLU MLP, LM head tied to the shared embedding)
and v1.1/Flan-shaped (gated MLP, own LM head) — experts as seeded perturbations of ALL weights (ties kept), GLUE
fixture data with the real column names written into the shipped glue_t5 prompts, labelled by each task's expert
(so the individual row is exactly 1 and a merge has something to lose or recover)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusion.data.contract import check_task_pool
from fusion.errors import ConfigError
from fusion.merge.task_vectors import PoolMismatchError
from fusion.pools.contract import check_model_pool
from tests.test_text_backbone import TASKS, WORDS, build_data

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[1]
LABEL_WORDS = {"sst2": ["negative", "positive"], "mnli": ["entailment", "neutral", "contradiction"]}  # GLUE defaults
KINDS = {"tied": (True, "relu"), "untied": (False, "gated-gelu")}  # T5 v1.0 / v1.1 (Flan-T5)
MAX_LENGTH = 64


def glue_t5_templates() -> dict[str, str]:
    """The prompts of the shipped conf/taskpool/glue_t5.yaml."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "conf" / "taskpool" / "glue_t5.yaml")
    return {t: str(o.template) for t, o in cfg.overrides.items()}


def build_t5_tokenizer(directory: Path):
    """A WordLevel tokenizer over :data:`WORDS` and the label words (<pad> = 0, </s> = 1 appended to every text as
    T5's tokenizer does, <unk> = 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", *WORDS, *(w for ws in LABEL_WORDS.values() for w in ws), "given", "sentence"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(str(directory))
    return fast


def tiny_t5(vocab: int, tied: bool, ff: str):
    """A 2-layer, 16-wide T5 with dropout 0.1 (the pool must switch it off); ``tied=False``: its own LM head."""
    from torch import nn

    config = transformers.T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                   relative_attention_num_buckets=8, feed_forward_proj=ff, tie_word_embeddings=tied,
                                   dropout_rate=0.1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config)
    if not tied:  # this transformers ties every T5's LM head when built; a Flan-T5 checkpoint loads untied
        model.lm_head.weight = nn.Parameter(torch.randn(vocab, 16) * 0.5)
    return model


def build_t5_models(root: Path, kind: str, scale: float = 0.5) -> dict[str, Path]:
    """``{"base": dir, task: dir}``: a random base and one expert per task, each the base plus seeded noise of
    relative size ``scale`` on every (untied) parameter, saved with the tokenizer."""
    tied, ff = KINDS[kind]
    tokenizer = build_t5_tokenizer(root / "tok")
    torch.manual_seed(0)
    base = tiny_t5(len(tokenizer), tied, ff)
    dirs = {"base": root / kind / "base"}
    for i, task in enumerate(["base", *TASKS]):
        model = base if task == "base" else tiny_t5(len(tokenizer), tied, ff)
        if task != "base":
            torch.manual_seed(1 + i)
            model.load_state_dict(base.state_dict())
            with torch.no_grad():
                for p in model.parameters():  # each tied tensor once: the ties stay
                    p.add_(scale * p.abs().mean() * torch.randn_like(p))
        dirs[task] = root / kind / task
        model.save_pretrained(str(dirs[task]))
        tokenizer.save_pretrained(str(dirs[task]))
    return dirs


def first_step_logits(directory: Path, x: torch.Tensor) -> torch.Tensor:
    """``model(ids, mask, decoder_input_ids=start).logits[:, 0]`` of the transformers model itself, ``[B, V]``."""
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(str(directory)).eval()
    start = torch.full((len(x), 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        return model(input_ids=x[:, 0], attention_mask=x[:, 1], decoder_input_ids=start).logits[:, 0]


def label_by_experts(raw: Path, out: Path, dirs: dict[str, Path]) -> Path:
    """``out/<task>``: the fixture GLUE data of ``raw`` with every label replaced by the task expert's own prediction
    (argmax of its label words' first-step scores on the glue_t5 prompt)."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    tokenizer, templates = AutoTokenizer.from_pretrained(str(dirs["base"])), glue_t5_templates()
    for task in TASKS:
        data = load_from_disk(str(raw / task))
        ids = [tokenizer.convert_tokens_to_ids(w) for w in LABEL_WORDS[task]]
        for split in data:
            texts = [templates[task].format(**row) for row in data[split]]
            enc = tokenizer(texts, truncation=True, max_length=MAX_LENGTH, padding="max_length", return_tensors="pt")
            x = torch.stack([enc["input_ids"], enc["attention_mask"]], 1)
            labels = first_step_logits(dirs[task], x)[:, ids].argmax(-1).tolist()
            features = data[split].features
            data[split] = data[split].remove_columns("label").add_column("label", labels).cast(features)
        data.save_to_disk(str(out / task))
    return out


@pytest.fixture(scope="module")
def t5_root(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("t5")
    models = {k: build_t5_models(root, k) for k in KINDS}
    raw = build_data(root / "raw", n_train=40, n_test=32)
    return {**models, "data": label_by_experts(raw, root / "data", models["untied"]), "root": root}


def make_pool(dirs: dict, **kwargs):
    from fusion.pools.hf_seq2seq import hf_seq2seq_pool

    return hf_seq2seq_pool(str(dirs["base"]), {t: str(dirs[t]) for t in TASKS}, name="tiny_t5", **kwargs)


def make_taskpool(root: dict, kind: str = "untied", cache: Path | None = None, templates: dict | None = None):
    from fusion.data.text_tasks import text_taskpool

    templates = templates if templates is not None else glue_t5_templates()
    return text_taskpool(list(TASKS), str(root[kind]["base"]), MAX_LENGTH, data_root=str(root["data"]),
                         overrides={t: {"template": templates[t]} for t in TASKS},
                         token_cache=str(cache or root["root"] / "tokens"))


@pytest.mark.parametrize("kind", list(KINDS))
def test_adapter_logits_equal_the_transformers_models_own(t5_root, kind):
    pool = check_model_pool(make_pool(t5_root[kind]), "tiny_t5")
    taskpool = check_task_pool(make_taskpool(t5_root, kind), "tiny_t5")
    vocab = pool.encoder.model.config.vocab_size
    for task in TASKS:
        x, _ = taskpool.dataset(task, "test").batch(torch.arange(8))
        assert x.dtype == torch.int64 and x.shape == (8, 2, MAX_LENGTH) and bool((x[:, 1] == 0).any())
        ids = pool.heads.ids[task]
        want = first_step_logits(t5_root[kind][task], x)
        expert = pool.expert_encoder(task)
        with torch.no_grad():
            features = expert(x)
            got = pool.heads(features, task)
            assert features.shape == (8, vocab) and got.shape == (8, len(LABEL_WORDS[task]))
            assert pool.heads.num_classes(task) == len(LABEL_WORDS[task])
            assert torch.allclose(got, want[:, ids], atol=1e-5), (kind, task, (got - want[:, ids]).abs().max())
            assert torch.allclose(features, want, atol=1e-5)
            # the pretrained row is another model; dropout (0.1 in the config) is off even in train mode
            assert not torch.allclose(pool.heads(pool.encoder(x), task), want[:, ids], atol=1e-3)
            assert torch.equal(expert.train()(x), features)
    tokenizer = taskpool.tokenizer
    assert pool.heads.ids["sst2"] == tokenizer.convert_tokens_to_ids(["negative", "positive"])
    assert pool.encoder.model.config.dropout_rate == 0.1  # an exported merge keeps the checkpoint's config
    assert all(m.p == 0 for m in pool.encoder.modules() if isinstance(m, torch.nn.Dropout))
    with pytest.raises(ValueError, match=r"packed tokens \[B, 2, T\].*text task pool"):
        pool.encoder(torch.zeros(2, 3, 8, dtype=torch.long))


def tie_groups(model) -> list[set[str]]:
    from fusion.pools.tied import tied_aliases

    groups: dict[str, set[str]] = {}
    for alias, name in tied_aliases(model).items():
        groups.setdefault(name, {name}).add(alias)
    return sorted(groups.values(), key=sorted)


@pytest.mark.parametrize("kind", list(KINDS))
def test_task_vectors_hold_each_tied_tensor_once_and_merges_keep_the_ties(t5_root, kind, tmp_path):
    from fusion.merge.combine import task_arithmetic
    from fusion.methods.static import merged_encoder
    from fusion.param.coefficients import coefficient_merge

    pool = make_pool(t5_root[kind])
    tied = KINDS[kind][0]
    embeddings = {"model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"}
    assert tie_groups(pool.encoder) == [embeddings | ({"model.lm_head.weight"} if tied else set())]
    tv = pool.task_vectors()
    params = dict(pool.encoder.named_parameters())
    assert list(tv) == list(params) == list(pool.pretrained_state())  # each tied tensor once, under its first name
    assert len(pool.encoder.state_dict()) == len(tv) + (3 if tied else 2)
    assert "model.shared.weight" in tv and not {"model.encoder.embed_tokens.weight"} & set(tv)
    assert ("model.lm_head.weight" in tv) is not tied
    ff = [p for p, _ in pool.encoder.named_modules() if re.search(pool.mlp_pattern, p)]  # routed methods' MLPs
    assert ff == [f"model.{s}.block.{i}.layer.{j}.DenseReluDense" for s, j in (("encoder", 1), ("decoder", 2))
                  for i in range(2)]
    vocab = pool.encoder.model.config.vocab_size
    assert tv["model.shared.weight"].shape == (len(TASKS), vocab, 16)
    assert all(t.shape[0] == len(TASKS) and t.shape[1:] == params[n].shape for n, t in tv.items())
    for i, task in enumerate(TASKS):
        from transformers import AutoModelForSeq2SeqLM

        expert = AutoModelForSeq2SeqLM.from_pretrained(str(t5_root[kind][task]))
        base = AutoModelForSeq2SeqLM.from_pretrained(str(t5_root[kind]["base"]))
        assert torch.equal(tv["model.shared.weight"][i], expert.shared.weight - base.shared.weight)
    static = merged_encoder(pool, task_arithmetic(tv, lam=0.5))  # a static merge: θ0 + 0.5 Σ τ_k
    learned = coefficient_merge(pool.encoder, tv, init=0.5)  # layer-wise AdaMerging's functional merged model
    unloaded = learned.merge_and_unload()
    x, _ = make_taskpool(t5_root, kind).dataset("sst2", "test").batch(torch.arange(6))
    with torch.no_grad():
        assert torch.allclose(learned(x), static(x), atol=1e-5)  # functional_call ties the aliases to shared
        assert torch.allclose(unloaded(x), static(x), atol=1e-5)
    for merged in (static, unloaded):
        assert tie_groups(merged) == tie_groups(pool.encoder)
        want = pool.pretrained_state()["model.shared.weight"] + 0.5 * tv["model.shared.weight"].sum(0)
        assert torch.allclose(merged.model.decoder.embed_tokens.weight, want, atol=1e-6)
    assert not torch.allclose(static(x), pool.encoder(x), atol=1e-3)
    written = pool.exporter(static.state_dict(), tmp_path / "merged")  # export_model=true: reloads to the same logits
    assert written == {"model": str(tmp_path / "merged")} and (tmp_path / "merged" / "tokenizer.json").is_file()
    with torch.no_grad():
        assert torch.allclose(first_step_logits(tmp_path / "merged", x), static(x), atol=1e-5)
    from transformers import AutoModelForSeq2SeqLM

    reloaded = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "merged"))
    assert (reloaded.lm_head.weight is reloaded.shared.weight) is tied  # the ties survive the export


def test_templates_write_one_text_per_example_and_key_the_cache(t5_root, tmp_path, monkeypatch):
    import fusion.data.text_tasks as text_tasks
    from fusion.data.hf_tasks import DatasetSpecError

    assert text_tasks.fill_template({"a": ["x", "y"], "b": ["1", "2"]}, "{a}: {b} {{a}}", ["a", "b"]) == \
        ["x: 1 {a}", "y: 2 {a}"]
    calls = []
    real = text_tasks.tokenize_texts
    monkeypatch.setattr(text_tasks, "tokenize_texts", lambda *a: calls.append(a[0][0][0]) or real(*a))
    first = make_taskpool(t5_root, cache=tmp_path).dataset("sst2", "test")
    again = make_taskpool(t5_root, cache=tmp_path).dataset("sst2", "test")  # a fresh pool: from disk
    data = datasets.load_from_disk(str(t5_root["data"] / "sst2"))["validation"]
    prompt = glue_t5_templates()["sst2"].format(sentence=data[0]["sentence"])
    assert calls == [prompt] and torch.equal(first.inputs, again.inputs)
    tokenizer = make_taskpool(t5_root).tokenizer
    assert first.inputs[0, 0].tolist() == tokenizer(prompt, max_length=MAX_LENGTH, padding="max_length")["input_ids"]
    other = make_taskpool(t5_root, cache=tmp_path, templates={"sst2": "sst2 sentence: {sentence}", "mnli": "{premise}"})
    changed = other.dataset("sst2", "test")  # another template: another key, tokenised again
    assert calls == [prompt, f"sst2 sentence: {data[0]['sentence']}"]
    assert not torch.equal(changed.inputs, first.inputs) and len(list(tmp_path.glob("sst2-*.safetensors"))) == 2
    assert other.fingerprint() != make_taskpool(t5_root, cache=tmp_path).fingerprint()
    bad = make_taskpool(t5_root, cache=tmp_path, templates={"sst2": "review: {text}", "mnli": "{premise}"})
    with pytest.raises(DatasetSpecError, match=r"task 'sst2', overrides.sst2.template\).*column 'text'.*"
                                               r"\['sentence', 'label'\]"):
        bad.dataset("sst2", "test")


def test_bad_label_words_and_mismatched_ties_are_clear_errors(t5_root):
    from fusion.pools.hf_seq2seq import hf_seq2seq_pool

    dirs = t5_root["untied"]
    with pytest.raises(ConfigError, match=r"'not good' and 'not bad' of task 'sst2' share their first sub-token "
                                          r"'not'.*modelpool.label_words.sst2"):
        make_pool(dirs, label_words={"sst2": ["not good", "not bad"]})
    with pytest.raises(ConfigError, match=r"label word 'zebra' of task 'mnli' is unknown.*<unk>.*label_words.mnli"):
        make_pool(dirs, label_words={"mnli": ["entailment", "zebra", "neutral"]})
    with pytest.raises(ConfigError, match=r"tasks \['reviews'\] have no label words.*modelpool.label_words.reviews"):
        hf_seq2seq_pool(str(dirs["base"]), {"reviews": str(dirs["sst2"])})
    with pytest.raises(ConfigError, match=r"label_words given for \['qnli'\]"):
        make_pool(dirs, label_words={"qnli": ["yes", "no"]})
    pool = make_pool(dirs, label_words={"sst2": ["bad", "good"]})
    assert pool.heads.words["sst2"] == ["bad", "good"] and pool.heads.words["mnli"] == LABEL_WORDS["mnli"]
    with pytest.raises(PoolMismatchError, match=r"'lm_head.weight' is tied to 'shared.weight' in expert .*tied/sst2 "
                                                r"but to 'nothing' in the base"):
        hf_seq2seq_pool(str(dirs["base"]), {"sst2": str(t5_root["tied"]["sst2"])})


# ---- end to end through the CLI -------------------------------------------------------------------------------------

def cli_t5(root: dict, methods: list[str], out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python -m fusion.app -m method=...`` on the tiny Flan-shaped T5 pool and the glue_t5 task pool (as
    tests/test_text_backbone.py's ``cli`` does for hf_text)."""
    dirs = root["untied"]
    experts = ",".join(f"{t}:'{dirs[t]}'" for t in TASKS)
    cmd = [sys.executable, "-m", "fusion.app", "-m", f"method={','.join(methods)}", "modelpool=hf_t5",
           f"modelpool.base={dirs['base']}", f"modelpool.experts={{{experts}}}", "taskpool=glue_t5",
           f"taskpool.data_root={root['data']}", f"taskpool.max_length={MAX_LENGTH}", "trainer.fast_dev_run=2",
           "trainer.enable_progress_bar=false", "logger=none", "print_table=false", "num_threads=1",
           "eval_batch_size=16", "checkpoint_every=0", f"hydra.sweep.dir={out}", "hydra.sweep.subdir=${hydra.job.num}",
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "FUSION_CACHE": str(root["root"] / "cache"), "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, env=env, cwd=out.parent, text=True, capture_output=True, timeout=900)


def test_regmean_plusplus_refuses_an_encoder_decoder_naming_its_stacks(t5_root):
    from fusion.merge.regmean_plusplus import find_blocks
    from fusion.merge.task_vectors import HyperparameterError

    pool = make_pool(t5_root["untied"])
    with pytest.raises(HyperparameterError, match=r"2 stacks \['model.encoder.block', 'model.decoder.block'\].*"
                                                  r"use method=regmean"):
        find_blocks(pool.encoder)


def test_a_lora_expert_equals_peft_merge_and_unload(t5_root, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    from fusion.pools.hf_seq2seq import hf_seq2seq_pool

    dirs = t5_root["untied"]
    torch.manual_seed(3)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v", "wo"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(str(dirs["base"])), config)
    peft_model.save_pretrained(str(tmp_path / "lora"))
    want = peft_model.merge_and_unload().state_dict()
    pool = hf_seq2seq_pool(str(dirs["base"]), {"sst2": str(tmp_path / "lora"), "mnli": str(dirs["mnli"])})
    got = pool.experts["sst2"]
    assert set(got) == set(pool.pretrained_state())
    for key, value in got.items():
        assert torch.allclose(value, want[key.removeprefix("model.")], atol=1e-6), key
    moved = {k for k, v in pool.task_vectors().items() if bool(v[0].abs().max() > 0)}
    assert moved and all(k.endswith((".q.weight", ".v.weight", ".wo.weight")) for k in moved)

