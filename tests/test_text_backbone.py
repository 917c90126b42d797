"""HF sequence-classification backbones and GLUE-style text task pools through the one runner (issue 19, items 1 and
5): tiny random GPT-2 / RoBERTa / BERT saved with save_pretrained next to a tiny WordLevel tokenizer, experts as
seeded perturbations of the base's backbone with their own heads, fixture datasets with GLUE's column names."""
from __future__ import annotations

import json
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
from fusion.pools.contract import check_model_pool

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[1]
WORDS = ["good", "bad", "great", "awful", "movie", "plot", "the", "a", "is", "was", "not", "very", "cat", "dog", "sat",
         "on", "mat", "yes", "no", "maybe", "it", "rains", "sun", "shines"]
TASKS = {"sst2": 2, "mnli": 3}  # task -> number of labels (the heads differ in shape)


def build_tokenizer(directory: Path, token_types: bool):
    """A WordLevel tokenizer over :data:`WORDS` ([PAD] = 0, [UNK] = 1, [CLS] = 2 prefixed to every text); with
    ``token_types`` (BERT) the second text of a pair has token type 1 and the tokenizer returns the types."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A", pair="[CLS] $A $B:1",
                                                       special_tokens=[("[CLS]", 2)])
    names = ["input_ids", "token_type_ids", "attention_mask"] if token_types else ["input_ids", "attention_mask"]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", model_input_names=names)
    fast.save_pretrained(str(directory))
    return fast


def tiny_config(kind: str, num_labels: int, vocab: int):
    """A 2-layer, 16-wide config of ``kind`` with [PAD] = 0."""
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                       pad_token_id=0, bos_token_id=2, eos_token_id=2, num_labels=num_labels)
    cls = transformers.RobertaConfig if kind == "roberta" else transformers.BertConfig
    return cls(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=40, pad_token_id=0, num_labels=num_labels,
               type_vocab_size=2 if kind == "bert" else 1)


def build_models(root: Path, kind: str, scale: float = 0.05) -> dict[str, Path]:
    """``{"base": dir, task: dir}``: a random base and one expert per task, each the base's backbone plus seeded
    noise of relative size ``scale`` and its own random head, saved with the tokenizer."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    tokenizer = build_tokenizer(root / "tok" / kind, token_types=kind == "bert")
    vocab = len(tokenizer)
    base = AutoModelForSequenceClassification.from_config(tiny_config(kind, 2, vocab))
    dirs = {"base": root / kind / "base"}
    base.save_pretrained(str(dirs["base"]))
    tokenizer.save_pretrained(str(dirs["base"]))
    for i, (task, labels) in enumerate(TASKS.items()):
        torch.manual_seed(1 + i)
        expert = AutoModelForSequenceClassification.from_config(tiny_config(kind, labels, vocab))
        body = {k: v for k, v in base.base_model.state_dict().items()}
        with torch.no_grad():
            expert.base_model.load_state_dict(body)
            for p in expert.base_model.parameters():
                p.add_(scale * p.abs().mean() * torch.randn_like(p))
        dirs[task] = root / kind / task
        expert.save_pretrained(str(dirs[task]))
        tokenizer.save_pretrained(str(dirs[task]))
    return dirs


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))


def build_data(root: Path, n_train: int = 40, n_test: int = 24) -> Path:
    """``root/<task>``: DatasetDicts with GLUE's columns (sst2: sentence/label; mnli: premise/hypothesis/label,
    tested on validation_matched)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    rng = random.Random(0)
    for task, labels in TASKS.items():
        columns = ["sentence"] if task == "sst2" else ["premise", "hypothesis"]
        names = ["negative", "positive"] if task == "sst2" else ["entailment", "neutral", "contradiction"]
        features = Features({**{c: Value("string") for c in columns}, "label": ClassLabel(names=names)})

        def split(n: int) -> Dataset:
            rows = {c: [sentence(rng) for _ in range(n)] for c in columns}
            return Dataset.from_dict({**rows, "label": [rng.randrange(labels) for _ in range(n)]}, features=features)

        test = "validation" if task == "sst2" else "validation_matched"
        DatasetDict({"train": split(n_train), test: split(n_test)}).save_to_disk(str(root / task))
    return root


@pytest.fixture(scope="module")
def text_root(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("text")
    return {"data": build_data(root / "data"), **{k: build_models(root, k) for k in ("gpt2", "roberta", "bert")},
            "root": root}


def make_pool(dirs: dict):
    from fusion.pools.hf_text import hf_text_pool

    return hf_text_pool(str(dirs["base"]), {t: str(dirs[t]) for t in TASKS}, name="tiny")


def make_taskpool(root: dict, kind: str, max_length: int = 12, cache: Path | None = None):
    from fusion.data.text_tasks import text_taskpool

    return text_taskpool(list(TASKS), str(root[kind]["base"]), max_length, data_root=str(root["data"]),
                         token_cache=str(cache or root["root"] / "tokens"))


@pytest.mark.parametrize("kind", ["gpt2", "roberta", "bert"])
def test_adapter_logits_equal_the_transformers_models_own(text_root, kind):
    from transformers import AutoModelForSequenceClassification

    pool = check_model_pool(make_pool(text_root[kind]), "tiny")
    taskpool = check_task_pool(make_taskpool(text_root, kind), "tiny")
    for task in TASKS:
        x, _ = taskpool.dataset(task, "test").batch(torch.arange(8))
        channels = 3 if kind == "bert" else 2  # BERT's tokenizer adds token type ids (1 on a pair's second text)
        assert x.dtype == torch.int64 and x.shape == (8, channels, 12)
        if kind == "bert" and task == "mnli":
            assert bool((x[:, 2] == 1).any())
        assert bool((x[:, 1] == 0).any())  # some rows are padded: pooling must skip the padding
        model = AutoModelForSequenceClassification.from_pretrained(str(text_root[kind][task])).eval()
        with torch.no_grad():
            want = model(**dict(zip(("input_ids", "attention_mask", "token_type_ids"), x.unbind(1)))).logits
            got = pool.heads(pool.expert_encoder(task)(x), task)
        assert got.shape == (8, TASKS[task]) and pool.heads.num_classes(task) == TASKS[task]
        assert torch.allclose(got, want, atol=1e-5), (kind, task, (got - want).abs().max())
        # the pretrained reference row: pretrained backbone + this expert's head, not the expert model
        assert not torch.allclose(pool.heads(pool.encoder(x), task), want, atol=1e-4)
    with pytest.raises(ValueError, match=r"packed tokens \[B, 2 or 3, T\].*text task pool"):
        pool.encoder(torch.zeros(2, 3, 8, 8))  # images into a text backbone


@pytest.mark.parametrize("kind", ["gpt2", "roberta"])
def test_task_vectors_cover_the_backbone_only_and_heads_stay_per_task(text_root, kind):
    from transformers import AutoModelForSequenceClassification

    pool = make_pool(text_root[kind])
    tv = pool.task_vectors()
    assert set(tv) == set(pool.pretrained_state()) and all(n.startswith("body.") for n in tv)
    assert all(t.shape[0] == len(TASKS) for t in tv.values())
    base = AutoModelForSequenceClassification.from_pretrained(str(text_root[kind]["base"]))
    head = "score" if kind == "gpt2" else "classifier"
    assert not any(n.startswith(f"body.{head}") for n in tv)
    assert len(tv) == len(base.base_model.state_dict())  # every backbone tensor, nothing else
    assert pool.heads.tasks == list(TASKS)
    shapes = {t: [tuple(p.shape) for p in pool.heads.heads[t].parameters()] for t in TASKS}
    assert shapes["sst2"] != shapes["mnli"]
    if kind == "gpt2":  # Conv1D became nn.Linear: 2-D weights are [out, in]
        assert tv["body.h.0.mlp.c_fc.weight"].shape == (len(TASKS), 64, 16)
        ref = base.base_model.h[0].mlp.c_fc.weight  # Conv1D [in, out]
        assert torch.equal(pool.pretrained_state()["body.h.0.mlp.c_fc.weight"], ref.detach().T)


def test_the_base_may_be_a_plain_backbone_or_a_language_model(text_root, tmp_path):
    from transformers import AutoModelForSequenceClassification, GPT2LMHeadModel

    from fusion.pools.hf_text import hf_text_pool

    dirs = text_root["gpt2"]
    seq = AutoModelForSequenceClassification.from_pretrained(str(dirs["base"]))
    seq.base_model.save_pretrained(str(tmp_path / "plain"))  # GPT2Model: keys without the `transformer.` prefix
    lm = GPT2LMHeadModel(seq.config)
    lm.transformer.load_state_dict(seq.base_model.state_dict())
    lm.save_pretrained(str(tmp_path / "lm"))
    want = make_pool(dirs).pretrained_state()
    for base in ("plain", "lm"):
        got = hf_text_pool(str(tmp_path / base), {t: str(dirs[t]) for t in TASKS}).pretrained_state()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), base


def test_fisher_loops_where_vmap_cannot_batch_an_hf_forward(text_root, caplog):
    from fusion.merge.fisher import diagonal_fisher
    from fusion.methods.data_merges import fisher_of

    pool, taskpool = make_pool(text_root["gpt2"]), make_taskpool(text_root, "gpt2")
    model, (x, _) = pool.expert_encoder("sst2"), taskpool.dataset("sst2", "train").batch(torch.arange(6))
    params = dict(model.named_parameters())
    forward = lambda m, inputs: pool.heads(m(inputs), "sst2")  # noqa: E731
    got = fisher_of(model, params, forward, [x[:3], x[3:]], seed=0)
    want = diagonal_fisher(model, params, forward, [x[:3], x[3:]], seed=0, vectorize=False)
    assert "looping over the examples" in caplog.text
    assert all(torch.equal(got[n], want[n]) for n in want) and sum(float(v.sum()) for v in got.values()) > 0


def test_mismatched_vocabulary_and_architecture_are_clear_errors(text_root, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from fusion.pools.hf_text import hf_text_pool

    dirs = text_root["gpt2"]
    bigger = AutoModelForSequenceClassification.from_pretrained(str(dirs["sst2"]))
    bigger.resize_token_embeddings(bigger.config.vocab_size + 3)
    bigger.save_pretrained(str(tmp_path / "added"))
    with pytest.raises(PoolMismatchError, match=r"body.wte.weight.*vocabularies differ.*resize_token_embeddings"):
        hf_text_pool(str(dirs["base"]), {"sst2": str(tmp_path / "added")})
    with pytest.raises(PoolMismatchError, match="model_type='gpt2'.*'roberta'"):
        hf_text_pool(str(dirs["base"]), {"sst2": str(text_root["roberta"]["sst2"])})
    with pytest.raises(ConfigError, match=r"modelpool.tasks \['qnli'\]"):
        hf_text_pool(str(dirs["base"]), {"sst2": str(dirs["sst2"])}, tasks=["qnli"])


@pytest.mark.parametrize("kind, reserved", [("gpt2", 0), ("roberta", 2)])
def test_inputs_longer_than_the_models_positions_are_a_clear_error(text_root, kind, reserved):
    from transformers import AutoConfig

    from fusion.pools.hf_text import hf_text_pool

    dirs = text_root[kind]
    config = AutoConfig.from_pretrained(str(dirs["base"])).to_dict()
    limit = config.get("n_positions", config.get("max_position_embeddings")) - reserved
    pool = hf_text_pool(str(dirs["base"]), {"sst2": str(dirs["sst2"])})
    fits = torch.ones(2, 2, limit, dtype=torch.long)
    assert pool.encoder(fits).shape[0] == 2  # the longest input the model embeds runs
    with pytest.raises(ConfigError, match=f"inputs of {limit + 1} tokens exceed the {limit} positions.*"
                                          f"taskpool.max_length ≤ {limit}"):
        pool.encoder(torch.ones(2, 2, limit + 1, dtype=torch.long))


def test_tokenisation_is_cached_by_fingerprint_tokenizer_and_length(text_root, tmp_path, monkeypatch):
    import fusion.data.text_tasks as text_tasks

    calls = []
    real = text_tasks.tokenize_columns
    monkeypatch.setattr(text_tasks, "tokenize_columns", lambda *a: calls.append(a[3]) or real(*a))
    first = make_taskpool(text_root, "gpt2", cache=tmp_path).dataset("sst2", "test")
    assert calls == [12]
    again = make_taskpool(text_root, "gpt2", cache=tmp_path).dataset("sst2", "test")  # a fresh pool: from disk
    assert calls == [12] and torch.equal(first.inputs, again.inputs) and torch.equal(first.labels, again.labels)
    make_taskpool(text_root, "gpt2", max_length=10, cache=tmp_path).dataset("sst2", "test")
    assert calls == [12, 10]
    other = make_taskpool(text_root, "gpt2", cache=tmp_path)
    other.tokenizer.padding_side = "left"  # another tokenizer configuration: another key
    assert other.fingerprint() != make_taskpool(text_root, "gpt2", cache=tmp_path).fingerprint()
    other.dataset("sst2", "test")
    assert calls == [12, 10, 12] and len(list(tmp_path.glob("sst2-*.safetensors"))) == 3


def test_text_task_pool_splits_columns_and_bad_specs(text_root, tmp_path):
    from fusion.data.hf_tasks import DatasetSpecError
    from fusion.data.text_tasks import text_taskpool

    pool = make_taskpool(text_root, "gpt2", cache=tmp_path)
    sizes = {s: len(pool.dataset("mnli", s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 36, "val": 4, "test": 24}  # val carved from train, test = validation_matched
    assert pool.classnames("mnli") == ("entailment", "neutral", "contradiction")
    assert pool.select(["mnli"]).tasks == ["mnli"]
    bad = text_taskpool(["sst2"], str(text_root["gpt2"]["base"]), 8, data_root=str(text_root["data"]),
                        overrides={"sst2": {"text_columns": ["text"]}}, token_cache=str(tmp_path))
    with pytest.raises(DatasetSpecError, match="no column 'text'.*'sentence'"):
        bad.dataset("sst2", "test")
    with pytest.raises(ConfigError, match="not a GLUE task"):
        text_taskpool(["reviews"], "unused")


# ---- end to end through the CLI -------------------------------------------------------------------------------------

def cli(root: dict, kind: str, methods: list[str], out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python -m fusion.app -m method=...`` on the fixture text pool of ``kind`` (two optimizer steps)."""
    experts = ",".join(f"{t}:'{root[kind][t]}'" for t in TASKS)
    cmd = [sys.executable, "-m", "fusion.app", "-m", f"method={','.join(methods)}", "modelpool=hf_text",
           f"modelpool.base={root[kind]['base']}", f"modelpool.experts={{{experts}}}", "taskpool=glue",
           f"taskpool.data_root={root['data']}", "taskpool.max_length=12", "trainer.fast_dev_run=2",
           "trainer.enable_progress_bar=false", "logger=none", "print_table=false", "num_threads=1",
           "eval_batch_size=16", "checkpoint_every=0", f"hydra.sweep.dir={out}", "hydra.sweep.subdir=${hydra.job.num}",
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "FUSION_CACHE": str(root["root"] / "cache"), "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, env=env, cwd=out.parent, text=True, capture_output=True, timeout=900)


def results(out: Path) -> dict[str, dict]:
    return {r["method"]: r for r in (json.loads(p.read_text()) for p in sorted(out.glob("*/results.json")))}


def test_routed_methods_refuse_roberta_clearly(text_root, tmp_path):
    """Every other method on RoBERTa: tests/test_text_methods.py."""
    failed = cli(text_root, "roberta", ["wemoe"], tmp_path / "roberta_wemoe")
    assert failed.returncode != 0
    assert "no transformer MLP blocks found" in failed.stderr and "BERT/RoBERTa" in failed.stderr


@pytest.mark.parametrize("kind, targets", [("gpt2", ["c_attn", "c_fc"]), ("roberta", ["query", "value", "dense"])])
def test_a_lora_classifier_expert_equals_peft_merge_and_unload(text_root, kind, targets, tmp_path):
    """A peft SEQ_CLS adapter: backbone θ0 + s·B A (GPT-2's Conv1D: fan_in_fan_out), its head saved whole."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from fusion.pools.hf_text import hf_text_pool

    dirs = text_root[kind]
    torch.manual_seed(5)
    base = AutoModelForSequenceClassification.from_pretrained(str(dirs["base"]), num_labels=3,
                                                              ignore_mismatched_sizes=True)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=2, lora_alpha=4, target_modules=targets,
                        init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    head = peft_model.base_model.model.score if kind == "gpt2" else peft_model.base_model.model.classifier
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()  # a trained head, not the base's
    peft_model.save_pretrained(str(tmp_path / "lora"))
    merged = peft_model.merge_and_unload().eval()
    pool = hf_text_pool(str(dirs["base"]), {"mnli": str(tmp_path / "lora"), "sst2": str(dirs["sst2"])})
    assert pool.heads.num_classes("mnli") == 3 and pool.sources["mnli"] == str(tmp_path / "lora")
    x, _ = make_taskpool(text_root, kind).dataset("mnli", "test").batch(torch.arange(8))
    with torch.no_grad():
        want = merged(input_ids=x[:, 0], attention_mask=x[:, 1]).logits
        got = pool.heads(pool.expert_encoder("mnli")(x), "mnli")
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    moved = {n for n, t in pool.task_vectors().items() if bool(t[0].abs().max() > 0)}
    assert moved and all(any(f".{m}." in n for m in targets) for n in moved)
    bare = LoraConfig(r=2, target_modules=targets, init_lora_weights=False)  # no task_type: no head saved
    get_peft_model(AutoModelForSequenceClassification.from_pretrained(str(dirs["base"])), bare).save_pretrained(
        str(tmp_path / "bare"))
    with pytest.raises(ConfigError, match=r"bare saves no '(score|classifier)' head.*task_type='SEQ_CLS'"):
        hf_text_pool(str(dirs["base"]), {"mnli": str(tmp_path / "bare")})
