"""Scale-out and operations on the tiny pool: DDP and FSDP, submitit sweeps, sweep reports, loggers, checkpoints,
seeds.

Subprocess runs (DDP, FSDP, the submitit sweep, a run killed with SIGKILL) use ``python -m fusion.app`` with a timeout;
everything else runs in-process through :func:`tests.test_app.run_app`.
"""
from __future__ import annotations

import csv
import glob
import json
import logging
import os
import re
import signal
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from pytorch_lightning.loggers import CSVLogger

from fusion.sweep import main as fusion_report
from fusion.train.checkpoint import LAST, read_checkpoint
from tests.test_app import run_app, tiny_overrides

LAYER_WISE = "adamerging_layer_wise"

# Test-only callbacks, importable by the subprocesses (written next to each test's files, put on PYTHONPATH).
PROBE = '''
import json, os, signal
import pytorch_lightning as pl
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook


class CountReductions(pl.Callback):
    """Records every DDP gradient all-reduce (one call per bucket) and writes them per rank at the end."""

    def __init__(self, out):
        self.out, self.calls = out, []

    def on_train_start(self, trainer, pl_module):
        def hook(state, bucket):
            self.calls.append([trainer.global_step, bucket.buffer().numel()])
            return allreduce_hook(state, bucket)
        trainer.strategy.model.register_comm_hook(None, hook)

    def on_train_end(self, trainer, pl_module):
        with open(os.path.join(self.out, f"reductions_{trainer.global_rank}.json"), "w") as f:
            json.dump({"world_size": trainer.world_size, "calls": self.calls}, f)


class KillAt(pl.Callback):
    """SIGKILL this process right after optimizer step ``step`` (no clean-up of any kind)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def run_cli(args: list[str], workdir: Path, timeout: int = 300) -> tuple[int, str]:
    """``python -m fusion.app *args`` in ``workdir`` with the probe callbacks importable; (return code, output)."""
    (workdir / "probe.py").write_text(PROBE)
    env = os.environ | {"OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1", "WANDB_MODE": "offline",
                        "PYTHONPATH": os.pathsep.join([str(workdir), os.environ.get("PYTHONPATH", "")])}
    log_path = workdir / "cli.log"
    with open(log_path, "w") as log:  # a file, not a pipe: DDP's child rank inherits it and may outlive the parent
        proc = subprocess.run([sys.executable, "-m", "fusion.app", *args], stdout=log, stderr=subprocess.STDOUT,
                              env=env, cwd=workdir, timeout=timeout)
    return proc.returncode, log_path.read_text()


def app_args(tiny_dirs, out: Path, *extra: str, method: str = LAYER_WISE) -> list[str]:
    return tiny_overrides(tiny_dirs, out, method) + [f"hydra.run.dir={out}/hydra", *extra]


def coefficients(run_dir: Path) -> torch.Tensor:
    return torch.tensor(json.loads((run_dir / "coefficients.json").read_text())["lambdas"])


@contextmanager
def time_limit(seconds: int):
    """Fail (rather than hang) an in-process block that runs longer than ``seconds``."""
    def expire(*_):
        raise TimeoutError(f"took longer than {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- DDP and FSDP (sharded task vectors) -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_run(tiny_dirs, tmp_path_factory) -> Path:
    """Layer-wise AdaMerging, 3 steps on 2 DDP ranks (gloo), counting each rank's gradient all-reduces."""
    two = tmp_path_factory.mktemp("ddp")
    code, output = run_cli(app_args(tiny_dirs, two, "method.steps=3", "checkpoint_every=0", "trainer=ddp",
                                    "trainer.accelerator=cpu", "trainer.devices=2",
                                    f"+trainer.callbacks=[{{_target_:probe.CountReductions,out:'{two}'}}]"), two)
    assert code == 0, output[-3000:]
    assert output.count("results written to") == 1  # rank 1 returned without evaluating or writing
    return two


def test_ddp_two_ranks_learn_what_one_process_learns(tiny_dirs, tmp_path, ddp_run):
    one = tmp_path / "one"
    run_app(tiny_dirs, one, LAYER_WISE, "method.steps=3", "checkpoint_every=0")
    two = ddp_run
    # same global batch (16 per task, 8 per rank): the same λ as one process; observed equal to the last bit
    assert torch.allclose(coefficients(two), coefficients(one), atol=1e-6, rtol=0)
    assert not torch.allclose(coefficients(two), torch.full_like(coefficients(two), 0.3))  # it trained
    assert json.loads((two / "results.json").read_text())["method"] == LAYER_WISE
    # gradients were all-reduced once per step on each rank: the one backward through the merge (3 × 32 λ)
    for rank in (0, 1):
        counts = json.loads((two / f"reductions_{rank}.json").read_text())
        assert counts["world_size"] == 2
        assert counts["calls"] == [[step, coefficients(one).numel()] for step in range(3)]


def test_fsdp_two_ranks_hold_half_the_task_vectors_and_learn_what_ddp_learns(tiny_dirs, tiny_pool, tmp_path, ddp_run):
    code, output = run_cli(app_args(tiny_dirs, tmp_path, "method.steps=3", "checkpoint_every=0", "trainer=fsdp",
                                    "trainer.accelerator=cpu", "trainer.devices=2"), tmp_path)
    assert code == 0, output[-3000:]
    assert output.count("results written to") == 1
    sharded, ddp = (json.loads((d / "results.json").read_text()) for d in (tmp_path, ddp_run))
    # rank 0 held its half of every task vector: K × Σ_l ⌈P_l / 2⌉ elements, not K × Σ_l P_l
    tv = tiny_pool.task_vectors()
    assert sharded["method_info"]["task_vector_sharding"] == {
        "world_size": 2, "rank": 0, "task_vector_numel_unsharded": sum(t.numel() for t in tv.values()),
        "task_vector_numel_per_rank": len(tiny_pool.tasks) * sum(-(-t[0].numel() // 2) for t in tv.values())}
    assert "task_vector_sharding" not in ddp["method_info"]
    # the same ranks and batches: the λ DDP learns (the ranks' partial sums add up to the full gradient; the
    # gradients themselves, for coefficients and Concrete masks: tests/test_contract.py)
    assert torch.allclose(coefficients(tmp_path), coefficients(ddp_run), atol=1e-6, rtol=0)
    assert not torch.allclose(coefficients(tmp_path), torch.full_like(coefficients(tmp_path), 0.3))
    assert sharded["mean_accuracy"] == pytest.approx(ddp["mean_accuracy"], abs=1e-6)


def test_fsdp_runs_concrete_adamerging_both_phases_sharded(tiny_dirs, tmp_path):
    """Two Trainers in one run (mask meta-learning, then AdaMerging), both bi-level passes reduced by the merge."""
    code, output = run_cli(app_args(tiny_dirs, tmp_path, "method.phase1.steps=2", "method.phase2.steps=2",
                                    "checkpoint_every=0", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
                                    method="concrete_adamerging_layer_wise"), tmp_path)
    assert code == 0, output[-3000:]
    assert output.count("results written to") == 1
    info = json.loads((tmp_path / "results.json").read_text())["method_info"]
    assert info["task_vector_sharding"]["world_size"] == 2
    assert info["task_vector_sharding"]["task_vector_numel_per_rank"] < info["task_vector_sharding"][
        "task_vector_numel_unsharded"]
    from safetensors.torch import load_file

    logits = load_file(str(tmp_path / "mask_logits.safetensors"))
    assert any(x.abs().max() > 0 for x in logits.values())  # the mask meta-learned (logits start at 0)


def test_bilevel_training_refuses_the_ddp_wrapper_naming_fsdp():
    from types import SimpleNamespace

    from torch.nn.parallel import DistributedDataParallel

    from fusion.train.bilevel import refuse_ddp_wrapper

    refuse_ddp_wrapper(SimpleNamespace(model=torch.nn.Linear(2, 2)))  # unwrapped: fine
    with pytest.raises(RuntimeError, match="use trainer=fsdp"):
        refuse_ddp_wrapper(SimpleNamespace(model=DistributedDataParallel.__new__(DistributedDataParallel)))


# ---- SLURM / submitit --------------------------------------------------------------------------------------------

def test_slurm_launcher_without_partition_names_the_field(tmp_path, monkeypatch, capsys):
    from hydra.core.global_hydra import GlobalHydra

    from fusion.app import main

    monkeypatch.setattr(sys, "argv", ["fusion", "-m", "hydra/launcher=slurm", "method=ties",
                                      f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        GlobalHydra.instance().clear()
    captured = capsys.readouterr()
    assert exit_info.value.code == 1
    assert "Missing mandatory value: hydra.launcher.partition" in captured.out + captured.err
    assert not (tmp_path / "sweep").exists()  # nothing was submitted


def test_submitit_local_sweep_writes_every_job_and_a_report(tiny_dirs, tmp_path):
    pool_dir, task_dir = tiny_dirs
    sweep = tmp_path / "sweep"
    code, output = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                            "method=task_arithmetic,simple_average", "modelpool=dir", f"modelpool.directory={pool_dir}",
                            "taskpool=dir", f"taskpool.directory={task_dir}", "logger=none", "num_threads=1",
                            "++method.tune=null", "print_table=false", f"hydra.sweep.dir={sweep}",
                            "hydra.sweep.subdir=${hydra.job.num}"], tmp_path)
    assert code == 0, output[-3000:]
    runs = {json.loads(p.read_text())["method"]: p for p in sweep.glob("*/results.json")}
    assert sorted(runs) == ["simple_average", "task_arithmetic"]
    assert fusion_report([str(sweep)]) == 0
    report = (sweep / "report.csv").read_text().splitlines()
    assert len(report) == 3 and {line.split(",")[0] for line in report[1:]} == set(runs)


# ---- fusion-report -----------------------------------------------------------------------------------------------

def write_run(root: Path, name: str, method: str, seed: int, per_task: dict, overrides: list[str] | None = None,
              config: dict | None = None) -> None:
    run = root / name
    run.mkdir(parents=True)
    results = {"method": method, "seed": seed, "per_task": per_task,
               "mean_accuracy": sum(per_task.values()) / len(per_task), "config": config or {"seed": seed}}
    (run / "results.json").write_text(json.dumps(results))
    if overrides is not None:
        (run / ".hydra").mkdir()
        (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def test_sweep_report_mean_and_std_over_seeds(tmp_path):
    for seed, (a, b) in enumerate([(0.5, 0.7), (0.6, 0.8), (0.7, 0.9)]):  # ties k=0.2: means 0.6, 0.7, 0.8
        write_run(tmp_path, f"t{seed}", "ties", seed, {"x": a, "y": b}, ["method=ties", f"seed={seed}", "k=0.2"])
    write_run(tmp_path, "t9", "ties", 0, {"x": 0.2, "y": 0.4}, ["method=ties", "seed=0", "k=0.5"])
    for seed, acc in enumerate([0.25, 0.75]):  # no overrides.yaml: configuration from the (identical) config
        write_run(tmp_path, f"s{seed}", "simple_average", seed, {"x": acc, "y": acc},
                  config={"seed": seed, "method": {"name": "simple_average"}})
    assert fusion_report([str(tmp_path)]) == 0
    rows = {(r[0], r[1]): r for r in (line.split(",") for line in (tmp_path / "report.csv").read_text().splitlines())}
    header = rows.pop(("method", "configuration"))
    col = {name: i for i, name in enumerate(header)}

    def value(row, name):
        return float(row[col[name]])

    ties = rows[("ties", "k=0.2")]
    assert ties[col["n_seeds"]] == "3" and ties[col["seeds"]] == "0 1 2"
    assert value(ties, "mean_accuracy_mean") == pytest.approx(0.7, abs=1e-12)
    assert value(ties, "mean_accuracy_std") == pytest.approx(0.1, abs=1e-12)  # sample std of 0.6, 0.7, 0.8
    assert value(ties, "x_mean") == pytest.approx(0.6, abs=1e-12) and value(ties, "y_std") == pytest.approx(0.1)
    single = rows[("ties", "k=0.5")]
    assert value(single, "mean_accuracy_mean") == pytest.approx(0.3) and value(single, "mean_accuracy_std") == 0.0
    average = rows[("simple_average", "")]
    assert value(average, "mean_accuracy_mean") == pytest.approx(0.5)
    assert value(average, "mean_accuracy_std") == pytest.approx(0.5 / 2 ** 0.5, abs=1e-12)  # |0.75 − 0.25| / √2
    assert len(rows) == 3
    markdown = (tmp_path / "report.md").read_text()
    assert "| ties | k=0.2 | 3 | 60.0 ± 10.0 | 80.0 ± 10.0 | 70.0 ± 10.0 |" in markdown
    assert (tmp_path / "report.png").stat().st_size > 1000


def test_sweep_report_without_results_exits_2_naming_the_directory(tmp_path, capsys):
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        fusion_report([str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"no results.json found under {tmp_path}" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()


# ---- loggers -----------------------------------------------------------------------------------------------------

def wandb_records(run_file: Path):
    """The protobuf records of a W&B ``run-*.wandb`` file (LevelDB-log framing: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = run_file.read_bytes(), 32768, 7, b""  # 7-byte file header ':W&B' + magic + version
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a header: zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_logs_config_metrics_and_plots(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    with time_limit(120):
        res = run_app(tiny_dirs, tmp_path, LAYER_WISE, "method.steps=2", "logger=csv_wandb", "seed=7",
                      "trainer.log_every_n_steps=1",
                      f"logger.wandb.save_dir={tmp_path}", f"logger.csv.save_dir={tmp_path}", "logger.wandb.tags=[ops]")
    run_files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(run_files) == 1
    history, config = {}, {}
    for record in wandb_records(Path(run_files[0])):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item}
        elif kind == "config":
            config |= {item.key: json.loads(item.value_json) for item in record.config.update}
        elif kind == "run":
            assert record.run.run_group == LAYER_WISE and list(record.run.tags) == ["ops"]
    assert config["seed"] == 7 and config["method"]["name"] == LAYER_WISE  # the full config
    for task, acc in res["per_task"].items():
        assert history[f"test/acc/{task}"] == pytest.approx(acc, abs=1e-6)
    assert "train/entropy" in history
    assert history["plots/coefficients/_type"] == "images/separated"  # coefficients.png as an image
    image = Path(run_files[0]).parent / "files" / history["plots/coefficients/filenames"][0]
    assert image.stat().st_size > 1000
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()  # the CSV logger ran alongside
    assert "test/acc/mean" in metrics.splitlines()[0]


class BrokenLogger(CSVLogger):
    """Cannot even be built."""

    def __init__(self, **kwargs):
        raise RuntimeError("no route to the tracking server")


class FailsOnFirstUse(CSVLogger):
    """Builds, then fails when first used."""

    def log_hyperparams(self, params, *args, **kwargs):
        raise ConnectionError("tracking server refused the run")


def test_loggers_that_cannot_start_warn_and_the_run_goes_on(tiny_dirs, tmp_path, caplog):
    me = __name__
    with caplog.at_level(logging.WARNING, logger="fusion"):
        res = run_app(tiny_dirs, tmp_path, "task_arithmetic", "++method.tune=null",
                      f"+logger.broken={{_target_:{me}.BrokenLogger}}",
                      f"+logger.first_use={{_target_:{me}.FailsOnFirstUse,save_dir:'{tmp_path}',name:bad}}",
                      f"+logger.csv={{_target_:pytorch_lightning.loggers.CSVLogger,save_dir:'{tmp_path}',name:csv}}")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'broken' could not start" in w and "no route to the tracking server" in w for w in warnings)
    assert any("'first_use' could not start" in w and "refused the run" in w for w in warnings)
    assert res["method"] == "task_arithmetic"  # results.json written (run_app reads it back)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("test/acc/mean")]
    assert float(logged[-1]["test/acc/mean"]) == pytest.approx(res["mean_accuracy"])  # the working logger goes on


# ---- checkpoints and resume --------------------------------------------------------------------------------------

def test_killed_run_resumes_to_the_uninterrupted_coefficients(tiny_dirs, tmp_path):
    killed = tmp_path / "killed"
    killed.mkdir()
    code, output = run_cli(app_args(tiny_dirs, killed, "method.steps=8", "checkpoint_every=2",
                                    "+trainer.callbacks=[{_target_:probe.KillAt,step:5}]"), killed)
    assert code == -signal.SIGKILL, output[-3000:]
    assert not (killed / "results.json").exists()
    checkpoint = read_checkpoint(killed / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4  # step 5 ran but was not checkpointed: the resumed run redoes it
    assert list(checkpoint["state_dict"]) == ["model.weighting.lambdas"]  # no frozen experts
    assert checkpoint["fusion"]["method"] == LAYER_WISE and checkpoint["optimizer_states"]
    assert [p.name for p in (killed / "checkpoints").iterdir()] == ["last.ckpt"]  # no temporary file left

    resumed, full = tmp_path / "resumed", tmp_path / "full"
    run_app(tiny_dirs, resumed, LAYER_WISE, "method.steps=8", "checkpoint_every=2", f"resume={killed}")
    run_app(tiny_dirs, full, LAYER_WISE, "method.steps=8", "checkpoint_every=0")
    assert torch.allclose(coefficients(resumed), coefficients(full), atol=1e-6, rtol=0)
    assert not torch.allclose(coefficients(full), checkpoint["state_dict"]["model.weighting.lambdas"], atol=1e-4)
    assert read_checkpoint(resumed / "checkpoints" / "last.ckpt")["global_step"] == 8


@pytest.fixture
def checkpointed_run(tiny_dirs, tmp_path) -> Path:
    run_app(tiny_dirs, tmp_path / "run", LAYER_WISE, "method.steps=2", "checkpoint_every=2")
    return tmp_path / "run"


def test_resume_from_another_method_names_the_mismatch(tiny_dirs, tmp_path, checkpointed_run):
    with pytest.raises(ValueError, match="method 'adamerging_layer_wise' in the checkpoint vs "
                                         "'adamerging_task_wise' in this run"):
        run_app(tiny_dirs, tmp_path / "new", "adamerging_task_wise", f"resume={checkpointed_run}")


def test_resume_from_another_pool_names_the_mismatch(tiny_dirs, tmp_path, checkpointed_run):
    path = checkpointed_run / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(path)
    checkpoint["fusion"]["pool_hash"] = "0123456789abcdef"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="pool_hash '0123456789abcdef' in the checkpoint vs"):
        run_app(tiny_dirs, tmp_path / "new", LAYER_WISE, f"resume={checkpointed_run}")


def test_resume_without_a_checkpoint_names_the_file(tiny_dirs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"no checkpoint at {tmp_path / 'empty' / LAST}")):
        run_app(tiny_dirs, tmp_path / "new", LAYER_WISE, f"resume={tmp_path / 'empty'}")


# ---- determinism -------------------------------------------------------------------------------------------------

def comparable(results: dict) -> dict:
    config = {k: v for k, v in results["config"].items() if k != "output_dir"}
    return {k: v for k, v in results.items() if k not in ("wall_time_s", "config")} | {"config": config}


def test_same_seed_same_results(tiny_dirs, tmp_path):
    first = run_app(tiny_dirs, tmp_path / "a", LAYER_WISE, "method.steps=3", "checkpoint_every=0")
    second = run_app(tiny_dirs, tmp_path / "b", LAYER_WISE, "method.steps=3", "checkpoint_every=0")
    run_app(tiny_dirs, tmp_path / "c", LAYER_WISE, "method.steps=3", "checkpoint_every=0", "seed=1")
    assert comparable(first) == comparable(second)
    assert torch.equal(coefficients(tmp_path / "a"), coefficients(tmp_path / "b"))
    assert not torch.equal(coefficients(tmp_path / "a"), coefficients(tmp_path / "c"))  # the seed matters


def test_resume_continues_only_the_stage_that_wrote_the_checkpoint(tmp_path):
    """A two-phase method re-runs (seeded) the phases before the checkpoint's stage and continues that one."""
    from fusion.methods.base import RunContext
    from fusion.train.checkpoint import Resume

    fits = []

    class Trainer:
        def __init__(self, stage, **kwargs):
            self.stage, self.kwargs = stage, kwargs

        def fit(self, module, datamodule, ckpt_path):
            fits.append((self.stage, self.kwargs["max_steps"], ckpt_path))

    ctx = RunContext(output_dir=tmp_path, trainer=Trainer, resume=Resume(tmp_path / "last.ckpt", "m/phase2"))
    ctx.fit(None, None, 3, stage="m/phase1")
    assert not ctx.resumed
    ctx.fit(None, None, 5, stage="m/phase2")
    assert fits == [("m/phase1", 3, None), ("m/phase2", 5, str(tmp_path / "last.ckpt"))] and ctx.resumed


def test_a_checkpoint_of_a_stage_the_method_does_not_run_is_refused(tiny_dirs, tmp_path, checkpointed_run):
    """An old-style or foreign stage: resume= must not be ignored silently."""
    path = checkpointed_run / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(path)
    assert checkpoint["fusion"]["stage"] == LAYER_WISE  # a one-stage method's stage is its name
    checkpoint["fusion"]["stage"] = f"{LAYER_WISE}/phase9"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="training stage 'adamerging_layer_wise/phase9', which method "
                                         "'adamerging_layer_wise' does not run"):
        run_app(tiny_dirs, tmp_path / "new", LAYER_WISE, "method.steps=2", f"resume={checkpointed_run}")
