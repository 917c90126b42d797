"""Every method on every language backbone (issue 19, item 3): each file of conf/method/ through the `fusion` CLI on
tiny HF text pools, one Hydra multirun per backbone, two optimizer steps for learned methods. Routed methods need an
MLP that is one module; BERT/RoBERTa's is not, and their refusal is tested in tests/test_text_backbone.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_text_backbone import REPO, TASKS, cli, text_root  # noqa: F401 (fixture)
from tests.test_causal_lm import TASKS as LM_TASKS
from tests.test_causal_lm import cli as cli_llama
from tests.test_causal_lm import lm_root  # noqa: F401 (fixture)
from tests.test_text_seq2seq import cli_t5, t5_root  # noqa: F401 (fixture)

pytest.importorskip("transformers")

METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
ROUTED = {"wemoe", "sparse_wemoe", "smear"}
BACKBONES = {"gpt2": METHODS, "roberta": sorted(set(METHODS) - ROUTED),
             "t5": sorted(set(METHODS) - {"regmean_plusplus"}),  # RegMean++ refuses encoder-decoders (tested there)
             "llama": METHODS}
POOLS = {"gpt2": "hf_text", "roberta": "hf_text", "t5": "hf_t5", "llama": "hf_causal_lm"}


def sweep(request, kind: str, out: Path) -> dict[str, dict]:
    """``{method: results.json}`` of one multirun of every method of ``kind`` on its fixture pool."""
    if kind == "t5":
        done = cli_t5(request.getfixturevalue("t5_root"), BACKBONES[kind], out)
    elif kind == "llama":
        done = cli_llama(request.getfixturevalue("lm_root"), BACKBONES[kind], out)
    else:
        done = cli(request.getfixturevalue("text_root"), kind, BACKBONES[kind], out)
    assert done.returncode == 0, f"{kind}: {done.stderr[-4000:]}"
    return {r["method"]: r for r in (json.loads(p.read_text()) for p in out.glob("*/results.json"))}


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_every_method_runs_on_the_text_backbone(request, kind, tmp_path):
    results = sweep(request, kind, tmp_path / "runs")
    assert sorted(results) == BACKBONES[kind]
    tasks = LM_TASKS if kind == "llama" else TASKS
    pretrained = next(iter(results.values()))["reference"]["pretrained"]["per_task"]
    for method, res in results.items():
        assert sorted(res["per_task"]) == sorted(tasks) and res["modelpool"] == POOLS[kind], method
        assert all(0.0 <= a <= 1.0 for a in res["per_task"].values()), method
        assert res["mean_accuracy"] == pytest.approx(sum(res["per_task"].values()) / len(tasks)), method
        assert res["reference"]["pretrained"]["per_task"] == pretrained, method  # one pool, one reference
    learned = {m for m, r in results.items() if "steps" in r["method_info"]}
    assert {"adamerging_layer_wise", "concrete_task_arithmetic"} <= learned
    if kind != "roberta":
        assert {"wemoe", "smear", "sparse_wemoe"} <= learned
    layers = set(results["regmean"]["method_info"]["regmean_layers"])  # Grams of token representations
    assert layers >= {"gpt2": {"body.h.0.attn.c_attn", "body.h.0.attn.c_proj", "body.h.0.mlp.c_fc",
                               "body.h.1.mlp.c_proj"},  # GPT-2's Conv1D made nn.Linear
                      "roberta": {"body.encoder.layer.0.attention.self.query", "body.encoder.layer.1.output.dense"},
                      "t5": {"model.encoder.block.0.layer.0.SelfAttention.q", "model.decoder.block.1.layer.1.EncDecAttention.o",
                             "model.encoder.block.0.layer.1.DenseReluDense.wi_0", "model.lm_head"},
                      "llama": {"model.model.layers.0.mlp.gate_proj", "model.model.layers.1.self_attn.o_proj",
                                "model.lm_head"}}[kind]
    if kind == "llama":  # the experts were fine-tuned a few steps: every merge moves off the pretrained model
        for method in ("task_arithmetic", "ties", "regmean", "fisher_merging", "adamerging_layer_wise"):
            assert results[method]["per_task"] != pretrained, method
    if kind == "t5":  # the data are labelled by each task's expert: its own row is exact, the pretrained model's is not
        assert results["ties"]["reference"]["individual"]["per_task"] == {t: 1.0 for t in TASKS}
        assert all(a < 1.0 for a in pretrained.values())
        for method in ("task_arithmetic", "ties", "regmean", "fisher_merging", "adamerging_layer_wise"):
            assert sum(results[method]["per_task"].values()) > sum(pretrained.values()), method
