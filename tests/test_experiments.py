"""conf/experiment/: the recipes behind the README's result rows, each a `# @package _global_` override set.

Every row of benchmarks/results/mini8.json that is more than a method name has an experiment file that names it
(``# README row: ...``) and composes to exactly the config of that row's overrides; every experiment runs end to end
for one optimizer step (``trainer.fast_dev_run=1``) on the tiny pool.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fusion.app import train

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def row_of(experiment: str) -> str:
    """The README row an experiment file names in its ``# README row:`` line."""
    text = (ROOT / "conf" / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_\n"), experiment
    return re.search(r"^# README row: (.+)$", text, re.M).group(1).strip()


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_every_readme_row_with_overrides_has_its_experiment():
    rows = json.loads((ROOT / "benchmarks" / "results" / "mini8.json").read_text())
    variants = {spec for spec in rows if " " in spec}
    assert variants  # the composition rows
    assert sorted(row_of(e) for e in EXPERIMENTS) == sorted(variants)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_to_the_config_of_its_row(experiment):
    method, *overrides = row_of(experiment).split()
    want = OmegaConf.to_container(composed(f"method={method}", *overrides).method, resolve=True)
    got = OmegaConf.to_container(composed(f"experiment={experiment}").method, resolve=True)
    assert got == want
    assert got != OmegaConf.to_container(composed(f"method={method}").method, resolve=True)  # it changes something


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_one_step(experiment, tiny_dirs, tmp_path):
    pool_dir, task_dir = tiny_dirs
    cfg = composed(f"experiment={experiment}", "modelpool=dir", f"modelpool.directory={pool_dir}", "taskpool=dir",
                   f"taskpool.directory={task_dir}", "logger=none", f"output_dir={tmp_path}", "print_table=false",
                   "trainer.enable_progress_bar=false", "num_threads=1", "trainer.fast_dev_run=1",
                   "checkpoint_every=0")
    results = train(cfg)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["method"] == cfg.method.name == row_of(experiment).split()[0]
    assert on_disk["mean_accuracy"] == pytest.approx(sum(on_disk["per_task"].values()) / 3)
    assert results["per_task"] == on_disk["per_task"] and list(on_disk["per_task"]) == ["alpha", "beta", "gamma"]
    if "init" in cfg.method and OmegaConf.is_dict(cfg.method.init):  # from task arithmetic's val-tuned λ
        assert on_disk["method_info"]["init_tuning"]["on"] == "val"
