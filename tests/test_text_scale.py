"""Learned merges of language models at scale (issue 19, item 4): task vectors kept in bfloat16 and sharded across
ranks (`trainer=fsdp`, 2 CPU ranks over gloo) on an HF text pool learn what one process learns with the same
bfloat16 task vectors, and rank 0 holds half of them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_text_backbone import REPO, TASKS, make_pool, text_root  # noqa: F401 (fixture)

pytest.importorskip("transformers")


def run(root: dict, out: Path, *extra: str) -> str:
    """Three steps of layer-wise AdaMerging (bfloat16 task vectors) on the tiny GPT-2 text pool; the log."""
    experts = ",".join(f"{t}:'{root['gpt2'][t]}'" for t in TASKS)
    args = ["method=adamerging_layer_wise", "method.steps=3", "method.tv_dtype=bfloat16", "modelpool=hf_text",
            f"modelpool.base={root['gpt2']['base']}", f"modelpool.experts={{{experts}}}", "taskpool=glue",
            f"taskpool.data_root={root['data']}", "taskpool.max_length=12", "trainer.enable_progress_bar=false",
            "logger=none", "print_table=false", "num_threads=1", "eval_batch_size=16", "checkpoint_every=0",
            f"hydra.run.dir={out}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "FUSION_CACHE": str(root["root"] / "cache"), "PYTHONPATH": str(REPO)}
    out.mkdir(parents=True)
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as handle:  # a file, not a pipe: the second rank inherits it
        code = subprocess.run([sys.executable, "-m", "fusion.app", *args], stdout=handle, stderr=subprocess.STDOUT,
                              env=env, cwd=out.parent, timeout=600).returncode
    text = log.read_text()
    assert code == 0, text[-3000:]
    return text


def lambdas(run_dir: Path) -> torch.Tensor:
    return torch.tensor(json.loads((run_dir / "coefficients.json").read_text())["lambdas"])


def test_bf16_task_vectors_sharded_over_two_ranks_learn_what_one_process_learns(text_root, tmp_path):
    run(text_root, tmp_path / "one")
    log = run(text_root, tmp_path / "fsdp", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2")
    assert log.count("results written to") == 1  # rank 1 returned without evaluating or writing
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "fsdp"))
    tv = make_pool(text_root["gpt2"]).task_vectors(dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in tv.values())
    assert two["method_info"]["task_vector_sharding"] == {
        "world_size": 2, "rank": 0, "task_vector_numel_unsharded": sum(t.numel() for t in tv.values()),
        "task_vector_numel_per_rank": len(TASKS) * sum(-(-t[0].numel() // 2) for t in tv.values())}
    assert "task_vector_sharding" not in one["method_info"]
    learned = lambdas(tmp_path / "fsdp")
    assert learned.shape == (len(TASKS), len(tv))  # one λ per task and backbone tensor
    assert not torch.allclose(learned, torch.full_like(learned, 0.3))  # it trained
    assert torch.allclose(learned, lambdas(tmp_path / "one"), atol=1e-5, rtol=0)
    assert two["mean_accuracy"] == pytest.approx(one["mean_accuracy"], abs=1e-6)
