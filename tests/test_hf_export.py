"""Merged HF models written back with save_pretrained (``export_model=true``, fusion.report.hf_export): reloaded with
``from_pretrained`` they give the merged encoder's logits; what has no single merged model is refused clearly."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fusion.errors import ConfigError
from fusion.merge.task_vectors import add_delta
from fusion.methods.base import MergeOutcome
from fusion.pools.openclip import copy_with_state
from fusion.report.hf_export import export_merge
from tests.test_text_backbone import TASKS, cli, make_pool, make_taskpool, text_root  # noqa: F401 (fixture)

transformers = pytest.importorskip("transformers")


def task_arithmetic(pool, lam: float = 0.3) -> dict[str, torch.Tensor]:
    """θ0 + λ Σ_k τ_k, computed here from the experts' states (independently of fusion's merges)."""
    base = pool.pretrained_state()
    return add_delta(base, {n: lam * sum(pool.expert_state(t)[n] - base[n] for t in pool.tasks) for n in base})


@pytest.mark.parametrize("kind", ["gpt2", "roberta"])
def test_exported_classifiers_reload_to_the_merged_logits(text_root, kind, tmp_path):
    from transformers import AutoModelForSequenceClassification

    pool, taskpool = make_pool(text_root[kind]), make_taskpool(text_root, kind)
    merged = copy_with_state(pool.encoder, task_arithmetic(pool))
    written = export_merge(pool, MergeOutcome(merged), tmp_path / "merged_model")
    assert sorted(written) == sorted(TASKS)
    for task in TASKS:
        directory = tmp_path / "merged_model" / task
        assert written[task] == str(directory) and (directory / "tokenizer.json").is_file()
        model = AutoModelForSequenceClassification.from_pretrained(str(directory)).eval()
        assert model.config.num_labels == TASKS[task]
        x, _ = taskpool.dataset(task, "test").batch(torch.arange(8))
        with torch.no_grad():
            got = model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits
            want = pool.heads(merged(x), task)
            expert = pool.heads(pool.expert_encoder(task)(x), task)
        assert torch.allclose(got, want, atol=1e-5), (kind, task, (got - want).abs().max())
        assert not torch.allclose(got, expert, atol=1e-4)  # the merge, not the expert checkpoint copied
    if kind == "gpt2":  # written back in the checkpoint's Conv1D layout [in, out]
        weight = model.transformer.h[0].mlp.c_fc.weight
        assert weight.shape == (16, 64)
        assert torch.equal(weight.detach().T, merged.state_dict()["body.h.0.mlp.c_fc.weight"])
    with pytest.raises(ConfigError, match="already exists.*never overwrites"):
        export_merge(pool, MergeOutcome(merged), tmp_path / "merged_model")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind


def test_what_is_not_one_merged_model_is_refused_naming_why(text_root, tmp_path):
    pool = make_pool(text_root["gpt2"])
    per_task = MergeOutcome({t: pool.encoder for t in TASKS}, inference="task id")
    with pytest.raises(ConfigError, match="one model per task.*export_model=false"):
        export_merge(pool, per_task, tmp_path / "a")
    with pytest.raises(ConfigError, match="Identity, not one merged SequenceClassifierEncoder.*routed_model"):
        export_merge(pool, MergeOutcome(nn.Identity()), tmp_path / "b")
    pool.exporter = None  # e.g. a CLIP pool
    with pytest.raises(ConfigError, match="cannot write merged models.*hf_text"):
        export_merge(pool, MergeOutcome(pool.encoder), tmp_path / "c")
    assert not any(tmp_path.iterdir())


def test_export_model_through_the_cli(text_root, tmp_path):
    from transformers import AutoModelForSequenceClassification

    done = cli(text_root, "gpt2", ["ties"], tmp_path / "run", "export_model=true")
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = [json.loads(p.read_text()) for p in (tmp_path / "run").glob("*/results.json")]
    assert sorted(results["merged_model"]) == sorted(TASKS)
    model = AutoModelForSequenceClassification.from_pretrained(results["merged_model"]["sst2"])
    assert model.config.num_labels == TASKS["sst2"]
