"""End-to-end runs of the Hydra app on the tiny pool fixture (seconds each)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from fusion.app import train

CONF = str(Path(__file__).resolve().parents[1] / "conf")
REQUIRED = {"method", "modelpool", "per_task", "mean_accuracy", "reference", "protocol", "seed", "pool_hash",
            "wall_time_s", "config"}


def tiny_overrides(tiny_dirs, out: Path, method: str) -> list[str]:
    pool_dir, task_dir = tiny_dirs
    return [f"method={method}", "modelpool=dir", f"modelpool.directory={pool_dir}", "taskpool=dir",
            f"taskpool.directory={task_dir}", "logger=none", f"output_dir={out}", "print_table=false",
            "trainer.enable_progress_bar=false", "num_threads=1"]


def run_app(tiny_dirs, tmp_path: Path, method: str, *extra: str) -> dict:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=tiny_overrides(tiny_dirs, tmp_path, method) + list(extra))
    results = train(cfg)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["mean_accuracy"] == pytest.approx(results["mean_accuracy"])
    return on_disk


def test_tiny_pool_has_a_gap(tiny_pool):
    acc = tiny_pool.manifest["accuracy"]["test"]
    assert acc["individual"]["mean_accuracy"] > acc["pretrained"]["mean_accuracy"] + 0.2
    assert set(tiny_pool.manifest["task_vectors"]["relative_norm"]) == set(tiny_pool.tasks)


@pytest.mark.parametrize("method", ["simple_average", "task_arithmetic", "ties"])
def test_static_methods_write_results(tiny_dirs, tmp_path, method):
    res = run_app(tiny_dirs, tmp_path, method)
    assert REQUIRED <= set(res)
    assert list(res["per_task"]) == ["alpha", "beta", "gamma"]
    assert all(0.0 <= a <= 1.0 for a in res["per_task"].values())
    assert res["mean_accuracy"] == pytest.approx(sum(res["per_task"].values()) / 3)
    assert set(res["reference"]) == {"pretrained", "individual", "task_arithmetic"}
    if method == "task_arithmetic":  # the reference row is the same merge, measured (or cached) on its own
        assert res["reference"]["task_arithmetic"]["per_task"] == res["per_task"]
        assert res["reference"]["task_arithmetic"]["hyperparameters"] == res["method_info"]["hyperparameters"]
    if method != "simple_average":
        tuning = res["method_info"]["tuning"]
        assert tuning["on"] == "val" and len(tuning["scores"]) > 1
        assert res["method_info"]["hyperparameters"]["lam"] == tuning["best"]["lam"]
        assert "tuned on the labeled val split" in res["protocol"]


def test_task_arithmetic_matches_an_independent_merge(tiny_dirs, tiny_pool, tiny_taskpool, tmp_path):
    res = run_app(tiny_dirs, tmp_path, "task_arithmetic", "++method.tune=null", "method.fn.lam=0.5")
    from fusion.evaluate import evaluate
    state = {k: v + 0.5 * sum(tiny_pool.experts[t][k] - v for t in tiny_pool.tasks)
             for k, v in tiny_pool.pretrained_state().items()}
    enc = tiny_pool.expert_encoder("alpha")
    enc.load_state_dict(state)
    expected = evaluate(enc, tiny_pool.heads, tiny_taskpool, split="test")
    assert res["per_task"] == pytest.approx(expected)


@pytest.mark.parametrize("method", ["adamerging_layer_wise", "adamerging_task_wise"])
def test_adamerging_run_writes_coefficients(tiny_dirs, tmp_path, method):
    res = run_app(tiny_dirs, tmp_path, method, "method.steps=4")
    assert "transductive" in res["protocol"] and "entropy" in res["protocol"]
    coeffs = json.loads((tmp_path / "coefficients.json").read_text())
    lam = torch.tensor(coeffs["lambdas"])
    assert lam.shape[0] == 3 and (lam.dim() == 1) == (method == "adamerging_task_wise")
    assert not torch.allclose(lam, torch.full_like(lam, 0.3))  # it trained
    assert (tmp_path / "coefficients.png").stat().st_size > 1000
    assert (tmp_path / "merge_parameters.safetensors").is_file()


def test_cli_cfg_job_and_multirun(tiny_dirs, tmp_path):
    pool_dir, task_dir = tiny_dirs
    job = subprocess.run([sys.executable, "-m", "fusion.app", "method=ties", "--cfg", "job"],
                         capture_output=True, text=True, check=True)
    assert "fusion.merge.ties.ties" in job.stdout
    args = [sys.executable, "-m", "fusion.app", "-m", "method=task_arithmetic,simple_average", "modelpool=dir",
            f"modelpool.directory={pool_dir}", "taskpool=dir", f"taskpool.directory={task_dir}", "logger=none",
            "num_threads=1", "++method.tune=null", f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${hydra.job.num}"]
    subprocess.run(args, capture_output=True, text=True, check=True)
    methods = sorted(json.loads(p.read_text())["method"] for p in tmp_path.glob("*/results.json"))
    assert methods == ["simple_average", "task_arithmetic"]


def test_mini8_pool_keeps_the_apps_thread_setting(tmp_path: Path) -> None:
    """The app sets ``num_threads`` before instantiating the pool; the pool loader must not reset it."""
    import torch

    from fusion.pools.mini8 import mini8_pool

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(FileNotFoundError):
            mini8_pool({"seed": 0}, root=str(tmp_path / "absent"), build_if_missing=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_reference_rows_come_from_the_task_pool_of_the_run(tiny_dirs, tiny_pool, other_tiny_taskpool, tmp_path,
                                                           monkeypatch):
    """Another task pool with the same task names gets its own measured rows, never the manifest's."""
    from fusion.data.taskpool import save_taskpool
    from fusion.evaluate import evaluate

    monkeypatch.setenv("FUSION_CACHE", str(tmp_path / "cache"))
    other = other_tiny_taskpool  # same tasks and class names, other images
    save_taskpool(other, tmp_path / "other")
    own = run_app(tiny_dirs, tmp_path / "own", "simple_average")
    manifest = tiny_pool.manifest["accuracy"]["test"]
    assert own["reference"]["pretrained"]["per_task"] == manifest["pretrained"]["per_task"]  # the builder's task pool
    res = run_app(tiny_dirs, tmp_path / "b", "simple_average", f"taskpool.directory={tmp_path / 'other'}")
    want = evaluate(tiny_pool.encoder, tiny_pool.heads, other, split="test")  # independent evaluation
    assert res["reference"]["pretrained"]["per_task"] == pytest.approx(want, abs=1e-6)
    assert res["reference"]["pretrained"]["per_task"] != manifest["pretrained"]["per_task"]
    assert res["taskpool_fingerprint"] == other.fingerprint() != own["taskpool_fingerprint"]
    cached = list((tmp_path / "cache" / "reference").glob(f"*-{other.fingerprint()}.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["taskpool_fingerprint"] == other.fingerprint()


def test_gpu_trainer_without_cuda_is_one_message_naming_the_config(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
           "FUSION_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "fusion.app", "trainer=gpu", "method=ties", f"output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trainer.accelerator=gpu" in proc.stderr and "conf/trainer/gpu.yaml" in proc.stderr
    assert "trainer=cpu" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists()  # failed before building or reading anything


def test_pool_device_moves_theta0_and_heads_while_experts_stay_on_the_host(tiny_dirs):
    """`pool.to(device)` (the run's device): task vectors and expert states are made there, the experts stay put."""
    from omegaconf import OmegaConf

    from fusion.app import is_distributed
    from fusion.pools.pool import load_pool

    pool = load_pool(tiny_dirs[0]).to("meta")  # a device without data: shows where every tensor is made
    task = pool.tasks[0]
    assert pool.device.type == "meta" and all(v.device.type == "cpu" for v in pool.experts[task].values())
    assert all(t.device.type == "meta" for t in pool.task_vectors().values())
    assert all(v.device.type == "meta" for v in pool.expert_state(task).values())
    assert next(iter(pool.heads.buffers())).device.type == "meta"
    host = load_pool(tiny_dirs[0])
    tv = host.task_vectors(device="cpu")
    name = next(iter(tv))
    want = torch.stack([host.experts[t][name] - host.encoder.state_dict()[name] for t in host.tasks])
    assert torch.equal(tv[name], want) and tv[name].abs().sum() > 0
    assert not is_distributed(OmegaConf.create({"devices": 1})) and is_distributed(OmegaConf.create({"devices": 2}))
    assert is_distributed(OmegaConf.create({"devices": 1, "num_nodes": 2}))
    assert is_distributed(OmegaConf.create({"devices": [0, 1]}))


def _copied_pool(tiny_dirs, tmp_path: Path) -> tuple[Path, Path]:
    import shutil

    pool = tmp_path / "pool"
    shutil.copytree(tiny_dirs[0], pool)
    return pool, sorted((pool / "experts").glob("*.safetensors"))[1]


def _cli(tiny_dirs, tmp_path: Path, pool: Path) -> subprocess.CompletedProcess:
    overrides = tiny_overrides((pool, tiny_dirs[1]), tmp_path / "out", "task_arithmetic")
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
           "FUSION_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "fusion.app", *overrides], capture_output=True, text=True,
                          timeout=120, env=env)


def test_a_nan_in_one_expert_is_an_error_at_load_naming_expert_key_and_file(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    pool, expert = _copied_pool(tiny_dirs, tmp_path)
    state = load_file(str(expert))
    key = sorted(k for k, v in state.items() if v.is_floating_point())[3]
    state[key].view(-1)[5] = float("nan")
    save_file(state, str(expert))
    proc = _cli(tiny_dirs, tmp_path, pool)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in (f"expert '{expert.stem}'", str(expert), f"key '{key}'", "1 non-finite"):
        assert needle in proc.stderr, needle
    assert not (tmp_path / "out" / "results.json").exists()  # nothing written at chance accuracy


def test_a_truncated_expert_file_is_named(tiny_dirs, tmp_path):
    pool, expert = _copied_pool(tiny_dirs, tmp_path)
    expert.write_bytes(expert.read_bytes()[:100])
    proc = _cli(tiny_dirs, tmp_path, pool)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{expert}: not a readable safetensors file" in proc.stderr and "truncated" in proc.stderr


def test_third_party_noise_filter():
    import logging

    from fusion.utils import ThirdPartyNoise

    def record(name, msg, level=logging.INFO, path="/x/site-packages/open_clip/factory.py"):
        return logging.LogRecord(name, level, path, 1, msg, None, None)

    f = ThirdPartyNoise()
    assert not f.filter(record("root", "Loading full pretrained weights"))           # open_clip INFO
    assert f.filter(record("root", "Loading", logging.WARNING))                      # its warnings stay
    assert f.filter(record("root", "something", path="/work/fusion/app.py"))         # not open_clip
    assert not f.filter(record("pytorch_lightning", "💡 Tip: For seamless cloud logging"))
    gpu = record("pytorch_lightning.utilities.rank_zero", "GPU available: False, used: False")
    assert f.filter(gpu) and not f.filter(gpu)                                        # once
    assert f.filter(record("fusion", "results written to x", path="/work/fusion/app.py"))


def run_reported(tiny_dirs, tmp_path: Path, method: str, *extra: str):
    """``train`` wrapped as the ``fusion`` entry point wraps it (user errors → one message, exit status 2)."""
    from fusion.app import report_user_errors

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=tiny_overrides(tiny_dirs, tmp_path, method) + list(extra))
    return report_user_errors(train)(cfg)


@pytest.mark.parametrize("method, extra, message", [
    ("ties", ["++method.tune=null", "method.fn.k=0"], "k is the kept fraction and must lie in (0, 1], got 0"),
    ("wemoe", ["method.model.depth=3"], "router depth must be 0"),
    ("adamerging_layer_wise", ["method.tv_dtype=int8"], "method.tv_dtype must be a floating torch dtype name"),
    ("adamerging_layer_wise", ["method.steps=0"], "method.steps must be ≥ 1, got 0"),
    ("adamerging_layer_wise", ["export_model=true"], "cannot write merged models (only HF checkpoint pools"),
])
def test_a_user_error_is_one_message_and_exit_status_2(tiny_dirs, tmp_path, capsys, monkeypatch, method, extra,
                                                       message):
    monkeypatch.delenv("FUSION_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_reported(tiny_dirs, tmp_path, method, *extra)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("fusion: error: ") and message in err, err
    assert "Traceback" not in err and err.count("\n") == 2  # the message and the FUSION_DEBUG hint
    monkeypatch.setenv("FUSION_DEBUG", "1")  # the debug flag keeps the exception (and its traceback)
    with pytest.raises(Exception, match=re.escape(message)):
        run_reported(tiny_dirs, tmp_path, method, *extra)


def test_a_bug_keeps_its_traceback(tiny_dirs, tmp_path, monkeypatch):
    from fusion.methods.static import StaticMerge

    def broken(self, *args):
        raise ZeroDivisionError("a bug in a merge")

    monkeypatch.setattr(StaticMerge, "run", broken)
    with pytest.raises(ZeroDivisionError, match="a bug in a merge"):
        run_reported(tiny_dirs, tmp_path, "ties")


def test_a_resume_from_another_method_is_a_user_error(tiny_dirs, tmp_path, capsys):
    run_app(tiny_dirs, tmp_path / "first", "adamerging_layer_wise", "method.steps=2", "checkpoint_every=2")
    with pytest.raises(SystemExit):
        run_reported(tiny_dirs, tmp_path / "second", "adamerging_task_wise", f"resume={tmp_path / 'first'}")
    err = capsys.readouterr().err
    assert "method 'adamerging_layer_wise' in the checkpoint vs 'adamerging_task_wise'" in err and "Traceback" not in err
