"""Task-id-at-inference methods: a compressed form of the K experts (:class:`fusion.merge.retrieval.TaskSpecific`)
from which each task's model is rebuilt when that task's inputs arrive (TALL-mask compression, EMR-Merging,
TSV-C). They are not one merged model: results.json says ``"inference": "task id"`` and records the storage
against the K task vectors; the README marks their rows.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from fusion.errors import ConfigError
from fusion.merge.retrieval import TaskSpecific, tensor_bytes
from fusion.methods.base import MergeOutcome, RunContext
from fusion.methods.static import as_partial, grid_accuracy, merged_encoder
from fusion.pools.pool import require_no_distractors


TASK_ID = "task id"


class TaskEncoders(Mapping):
    """``{task: encoder}`` built on access (``θ_0 + task_delta(k)``), so one task model exists at a time."""

    def __init__(self, pool, compressed: TaskSpecific):
        self.pool, self.compressed = pool, compressed

    def __getitem__(self, task: str) -> nn.Module:
        return merged_encoder(self.pool, self.compressed.task_delta(self.pool.tasks.index(task)))

    def __iter__(self) -> Iterator[str]:
        return iter(self.pool.tasks)

    def __len__(self) -> int:
        return len(self.pool.tasks)


def storage(compressed: TaskSpecific, tv) -> dict[str, Any]:
    """Bytes stored besides θ_0 against the K task vectors, and with θ_0 against the K experts (at the task
    vectors' dtype)."""
    kept = compressed.stored_bytes()
    vectors, k = tensor_bytes(tv), next(iter(tv.values())).shape[0]
    total = kept["shared"] + kept["per_task"]
    return {**{f"{name}_bytes": v for name, v in kept.items()}, "stored_bytes": total, "task_vectors_bytes": vectors,
            "fraction_of_task_vectors": total / vectors, "fraction_of_experts": (total + vectors / k) / vectors}


class TaskRetrieval:
    """``fn(τ, **hparams) -> TaskSpecific``; ``tune`` = ``{name: [values]}`` on the labeled ``tune_split``.

    With ``per_task`` every tuned value is chosen for each task on that task's own validation accuracy (TALL
    masks: λ_t per task, as the paper does), and ``fn`` receives one value per task; otherwise by the mean.
    """

    def __init__(self, fn: Callable[..., TaskSpecific], name: str | None = None,
                 tune: Mapping[str, Sequence[Any]] | None = None, per_task: bool = False, tune_split: str = "val"):
        if tune_split == "test":
            raise ConfigError("tune_split='test' would tune on test labels; use the validation split ('val')")
        self.fn, self.tune_split, self.per_task = as_partial(fn), tune_split, per_task
        self.tune = {k: list(v) for k, v in (tune or {}).items()}
        self.name = name or self.fn.func.__name__
        unknown = [k for k in self.tune if k not in self.fn.keywords]
        if unknown:
            raise ConfigError(f"method '{self.name}': tune keys {unknown} are not arguments set on fn "
                              f"({sorted(self.fn.keywords)}); add them to fn or fix tune")

    def select(self, pool, taskpool, tv, ctx: RunContext) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The hyperparameters to use and the tuning record (None when not tuned)."""
        defaults = dict(self.fn.keywords)
        if not self.tune:
            return defaults, None
        def accuracy(candidate):
            models = TaskEncoders(pool, self.fn(tv, **{**defaults, **candidate}))
            return ctx.evaluate(models, pool.heads, taskpool, self.tune_split)

        scores = [{**candidate, "per_task": acc, "mean_accuracy": sum(acc.values()) / len(acc)}
                  for candidate, acc in grid_accuracy(self.tune, accuracy, self.name, self.tune_split)]
        if self.per_task:
            best = {t: max(scores, key=lambda s: s["per_task"][t]) for t in pool.tasks}
            chosen = {k: [best[t][k] for t in pool.tasks] for k in self.tune}
        else:
            best = max(scores, key=lambda s: s["mean_accuracy"])
            chosen = {k: best[k] for k in self.tune}
        return {**defaults, **chosen}, {"on": self.tune_split, "per_task": self.per_task, "grid": self.tune,
                                        "scores": scores, "chosen": chosen}

    def run(self, pool, taskpool, ctx: RunContext) -> MergeOutcome:
        require_no_distractors(pool, self.name, "keeps one model per task")
        tv = pool.task_vectors()
        hparams, tuning = self.select(pool, taskpool, tv, ctx)
        compressed = self.fn(tv, **hparams)
        info = {"hyperparameters": hparams, "tuning": tuning, "inference": TASK_ID,
                "storage": storage(compressed, tv)}
        tuned = f"; hyperparameters tuned on the labeled {self.tune_split} split" if tuning else ""
        return MergeOutcome(TaskEncoders(pool, compressed), info,
                            protocol=f"task id at inference: each task's model is rebuilt from the compressed "
                                     f"experts (not a single merged model){tuned}",
                            inference=TASK_ID)
