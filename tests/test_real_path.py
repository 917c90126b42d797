"""The path real users take, end to end and offline: every method in conf/method/ through the `fusion` CLI on a
CLIP-shaped pool (open_clip local-dir release and HF CLIP checkpoint directories, `fusion.fixtures`) with HF task
datasets laid out like the real ones, read through the real configs `clip-vit-b32_TA8` / `clip-vit-b32_hf_TA8`
and `clip_TA8`. One Hydra multirun per pool runs every method for two optimizer steps (`trainer.fast_dev_run=2`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion.fixtures import build_fixtures

REPO = Path(__file__).resolve().parents[1]
METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
REQUIRED = {"method", "modelpool", "taskpool", "taskpool_fingerprint", "per_task", "mean_accuracy", "reference",
            "protocol", "seed", "pool_hash", "device", "method_info", "wall_time_s", "config"}
MODELPOOLS = {"open_clip": "clip-vit-b32_TA8", "hf": "clip-vit-b32_hf_TA8"}


def sweep_command(fixtures: dict, kind: str, out: Path) -> list[str]:
    """`fusion -m` over every method on the fixture pool ``kind``, two optimizer steps each."""
    return [sys.executable, "-m", "fusion.app", "-m", f"method={','.join(METHODS)}", f"modelpool={MODELPOOLS[kind]}",
            "taskpool=clip_TA8", *fixtures["overrides"][kind], "trainer.fast_dev_run=2",
            "trainer.enable_progress_bar=false", "logger=none", "print_table=false", "num_threads=1",
            "eval_batch_size=16", "checkpoint_every=0", f"hydra.sweep.dir={out}", "hydra.sweep.subdir=${hydra.job.num}"]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> tuple[dict, dict[str, dict[str, dict]]]:
    """The fixtures and ``{kind: {method: results.json}}``: both sweeps run at once (one thread each)."""
    root = tmp_path_factory.mktemp("real")
    fixtures = build_fixtures(root / "fixtures")
    env = {**os.environ, **fixtures["env"], "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    procs = {kind: subprocess.Popen(sweep_command(fixtures, kind, root / kind), env=env, cwd=root, text=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for kind in MODELPOOLS}
    results = {}
    for kind, proc in procs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{kind} sweep failed:\n{err[-4000:]}"
        runs = [json.loads(p.read_text()) for p in sorted((root / kind).glob("*/results.json"))]
        results[kind] = {r["method"]: r for r in runs}
    return fixtures, results


@pytest.mark.parametrize("kind", list(MODELPOOLS))
def test_every_method_runs_end_to_end_on_a_clip_shaped_pool(sweeps, kind):
    fixtures, every = sweeps
    results = every[kind]
    assert sorted(results) == sorted(r["config"]["method"]["name"] for r in results.values())
    assert sorted(results) == METHODS  # every file in conf/method/ wrote its results.json
    tasks = fixtures["tasks"]
    fingerprints = {r["taskpool_fingerprint"] for r in results.values()}
    assert len(fingerprints) == 1  # every job read the same task data
    for method, res in results.items():
        assert REQUIRED <= set(res), (method, sorted(REQUIRED - set(res)))
        assert list(res["per_task"]) == tasks and res["taskpool"] == "clip_TA8" and res["device"] == "cpu", method
        assert all(0.0 <= a <= 1.0 for a in res["per_task"].values()), method
        assert res["mean_accuracy"] == pytest.approx(sum(res["per_task"].values()) / len(tasks)), method
        assert set(res["reference"]) == {"pretrained", "individual", "task_arithmetic"}, method
        assert all(list(row["per_task"]) == tasks for row in res["reference"].values()), method
        assert res["modelpool"] == MODELPOOLS[kind] and isinstance(res["protocol"], str), method
    # the experts differ from θ0 (seeded perturbations), so the merged models are not all the pretrained model
    pretrained = results["task_arithmetic"]["reference"]["pretrained"]["per_task"]
    assert any(r["per_task"] != pretrained for r in results.values())
    learned = [m for m, r in results.items() if "steps" in r["method_info"]]
    assert {"adamerging_layer_wise", "wemoe", "smear", "concrete_task_arithmetic"} <= set(learned)
