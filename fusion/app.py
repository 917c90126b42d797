"""The Hydra entry point ``fusion``: build pool → method → (train) → evaluate → write results.json.

    fusion                                   # the default experiment on mini8
    fusion method=ties                       # any file in conf/method/
    fusion -m method=task_arithmetic,ties    # a sweep (local, or hydra/launcher=slurm)
    fusion trainer=gpu                       # everything (merges, statistics, training, evaluation) on the GPU
    fusion trainer=ddp trainer.devices=4     # learned methods on 4 GPUs (only rank 0 evaluates and writes)
    fusion resume=outputs/<method>/<time>    # continue a learned run from its checkpoints/last.ckpt

``fusion-merge`` (a static merge of HF checkpoint directories streamed tensor by tensor) is
:mod:`fusion.stream_app`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from fusion.data.contract import check_task_pool
from fusion.errors import ConfigError, report_user_errors
from fusion.evaluate import normalized_accuracy, summarize
from fusion.methods.base import MergeOutcome, RunContext
from fusion.pools.contract import check_model_pool
from fusion.reference import reference_rows
from fusion.report.hf_export import export_merge, require_exporter
from fusion.report.merge_files import write_merge_record
from fusion.report.tables import print_results
from fusion.train.checkpoint import PeriodicCheckpoint, resume_checkpoint, with_callbacks
from fusion.train.module import NonFiniteLossError
from fusion.train.progress import StepProgressBar
from fusion.utils import atomic_write_json, configure_threads, quiet_third_party, resolve_device

log = logging.getLogger("fusion")
# absolute: a relative path would be resolved as the module `conf` when started as the `fusion` console script
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def static_references(cfg: DictConfig) -> dict[str, tuple[Any, Any]]:
    """``{name: (method, config)}`` of the static merges under ``reference`` in the config (reference rows)."""
    return {name: (instantiate(conf), plain_config(conf)) for name, conf in (cfg.get("reference") or {}).items()}


def output_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def global_rank() -> int:
    """This process's rank: 0 unless Lightning's DDP launcher or SLURM/torchrun started several."""
    return rank_zero_only.rank


def leave_process_group() -> int:
    """After training, end this process's part in DDP; returns its rank (only rank 0 goes on to evaluate).

    Without a process group torchmetrics does not try to sync the evaluation of rank 0 with ranks that left.
    """
    rank = global_rank()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return rank


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain containers, resolved where every interpolation resolves."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # e.g. ${hydra:...} outside a Hydra run (compose API)
        return OmegaConf.to_container(cfg, resolve=False)


def start_loggers(cfg: DictConfig) -> list:
    """Every configured logger that starts: built and sent the full config; a failing one is skipped with a warning."""
    loggers, config = [], plain_config(cfg)
    for name, conf in (cfg.get("logger") or {}).items():
        try:
            logger = instantiate(conf)
            logger.log_hyperparams(config)  # first use: W&B starts its run here
        except Exception as err:
            log.warning("logger '%s' could not start, continuing without it: %s: %s", name, type(err).__name__, err)
            continue
        loggers.append(logger)
    return loggers


def finish_loggers(loggers: list, metrics: dict[str, float], out: Path) -> None:
    """Log test metrics and the run directory's PNG plots (loggers with ``log_image``), then close each logger.

    A W&B run is finished here (``experiment.finish``): otherwise the next job of a multirun in this process
    would log into it.
    """
    images = sorted(out.glob("*.png"))
    for logger in loggers:
        try:
            logger.log_metrics(metrics)
            log_image = getattr(logger, "log_image", None)
            for png in images if log_image else []:
                log_image(key=f"plots/{png.stem}", images=[str(png)])
            logger.finalize("success")
            finish = getattr(logger.experiment, "finish", None)
            if callable(finish):
                finish()
        except Exception as err:
            log.warning("logger %s failed at the end of the run (results.json is written): %s: %s",
                        type(logger).__name__, type(err).__name__, err)


def is_distributed(trainer: DictConfig) -> bool:
    """Whether conf/trainer starts several processes (devices × num_nodes > 1)."""
    devices = trainer.get("devices") or 1
    count = len(devices) if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices) else \
        (torch.cuda.device_count() if devices in ("auto", -1) else int(devices))
    return count * int(trainer.get("num_nodes") or 1) > 1


def trainer_factory(cfg: DictConfig, out: Path, method: str, pool_hash: str):
    """A Trainer factory ``(stage, **Trainer kwargs) -> Trainer``: conf/trainer with the periodic checkpoint of the
    training stage (also when resuming: it restores the data position and the RNG) and a progress bar that counts
    the stage's steps.

    conf/trainer is instantiated anew for every Trainer: a strategy object (ddp, fsdp) serves one Trainer only, and
    two-phase methods (Concrete AdaMerging) build two.
    """
    every = int(cfg.get("checkpoint_every") or 0)

    def make(stage: str, **kwargs) -> pl.Trainer:
        callbacks = [PeriodicCheckpoint(out / "checkpoints", every, method, pool_hash, stage)] \
            if every or cfg.get("resume") else []
        if cfg.trainer.get("enable_progress_bar", True):
            callbacks.append(StepProgressBar(stage))
        return with_callbacks(instantiate(cfg.trainer), callbacks)(**kwargs)

    return make


def run_method(method, name: str, pool, taskpool, ctx: RunContext) -> MergeOutcome:
    """``method.run``; a divergence first leaves its last good parameters (``*.last_good.*``, rank 0), and a
    ``resume=`` checkpoint that no training stage continued from is an error."""
    try:
        outcome = method.run(pool, taskpool, ctx)
    except NonFiniteLossError as err:
        if global_rank() == 0:
            for record in err.records.values():
                write_merge_record(record, ctx.output_dir, pool.tasks, suffix=".last_good")
        raise
    if ctx.resume is not None and not ctx.resumed:
        raise ConfigError(f"resume: {ctx.resume.path} was written in training stage '{ctx.resume.stage}', which "
                          f"method '{name}' does not run; resume with the same method")
    return outcome


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment described by ``cfg``; returns the results dict (also written to results.json).

    Under DDP every rank trains; only rank 0 evaluates, writes and logs, and the other ranks return ``{}``.
    """
    start = time.time()
    quiet_third_party()
    configure_threads(cfg.get("num_threads"))
    device = resolve_device(cfg.trainer.get("accelerator"))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    pool = check_model_pool(instantiate(cfg.modelpool), f"modelpool ({cfg.modelpool.get('_target_')})").to(device)
    if cfg.get("export_model", False):
        require_exporter(pool)  # before the method runs, not after
    taskpool = check_task_pool(instantiate(cfg.taskpool), f"taskpool ({cfg.taskpool.get('_target_')})")
    taskpool = taskpool.select(pool.tasks)
    method = instantiate(cfg.method)
    name = cfg.method.get("name") or method.__class__.__name__
    ctx = RunContext(output_dir=out, seed=int(cfg.seed), trainer=trainer_factory(cfg, out, name, pool.pool_hash),
                     loggers=start_loggers(cfg), eval_batch_size=int(cfg.eval_batch_size), device=device,
                     distributed=is_distributed(cfg.trainer),
                     resume=resume_checkpoint(cfg.resume, name, pool.pool_hash) if cfg.get("resume") else None)
    outcome = run_method(method, name, pool, taskpool, ctx)
    if leave_process_group() != 0:
        return {}
    for key, record in outcome.records.items():
        described = write_merge_record(record, out, pool.tasks)
        if described:
            outcome.info[key] = described
    merged = summarize(ctx.evaluate(outcome.encoder, pool.heads, taskpool, "test"))
    fingerprint = taskpool.fingerprint()
    reference = reference_rows(pool, taskpool, fingerprint, ctx, static_references(cfg))
    results = {
        "method": name, "modelpool": pool.name, "taskpool": taskpool.name, "taskpool_fingerprint": fingerprint,
        **merged, "normalized_accuracy": normalized_accuracy(merged["per_task"], reference["individual"]["per_task"]),
        "reference": reference, "inference": outcome.inference, "protocol": outcome.protocol, "seed": int(cfg.seed),
        "pool_hash": pool.pool_hash, "device": str(device),
        "method_info": outcome.info, "wall_time_s": round(time.time() - start, 2),
        "config": OmegaConf.to_container(cfg, resolve=False),
    }
    atomic_write_json(out / "results.json", results)
    if cfg.get("export_model", False):
        results["merged_model"] = export_merge(pool, outcome, out / "merged_model")
        atomic_write_json(out / "results.json", results)
    finish_loggers(ctx.loggers, {f"test/acc/{t}": a for t, a in merged["per_task"].items()} |
                   {"test/acc/mean": merged["mean_accuracy"]}, out)
    if cfg.get("print_table", True):
        print_results(results)
    log.info("results written to %s", out / "results.json")
    return results


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    """Console entry point; returns the mean test accuracy (for Hydra sweepers; None on DDP ranks > 0)."""
    return train(cfg).get("mean_accuracy")


if __name__ == "__main__":
    main()
