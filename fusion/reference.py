"""The reference rows of a run's table: the pretrained model (zero-shot), the individual experts, and the static
merges named under ``reference`` in ``conf/config.yaml`` (task arithmetic at its val-tuned λ).

Measured once per (pool content, task-pool fingerprint) and cached under ``<fusion cache>/reference``; a static
reference is measured again when its config changes. The pool manifest's own accuracies are used only when it
records the same task-pool fingerprint: rows are never taken from another dataset that merely shares task names.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fusion.data.cache import default_cache_dir
from fusion.evaluate import summarize
from fusion.methods.base import RunContext
from fusion.utils import atomic_write_json, read_json, sha256_json


def cached_rows(pool, fingerprint: str) -> dict[str, Any]:
    """What the cache file and the pool manifest hold for this pool and task pool (the manifest wins)."""
    path = default_cache_dir() / "reference" / f"{pool.content_key()}-{fingerprint}.json"
    cached = read_json(path) if path.is_file() else {}
    measured = pool.manifest.get("accuracy", {})
    return {**cached, **(measured.get("test", {}) if measured.get("taskpool_fingerprint") == fingerprint else {})}


def measure(name: str, method, pool, taskpool, ctx: RunContext) -> dict[str, Any]:
    """Test accuracies of the pretrained model, the experts (each on its task) or a static merge (+ its
    hyperparameters)."""
    if method is not None:
        outcome = method.run(pool, taskpool, ctx)
        per_task = ctx.evaluate(outcome.encoder, pool.heads, taskpool, "test")
        return {**summarize(per_task), "hyperparameters": outcome.info.get("hyperparameters")}
    encoder = pool.encoder if name == "pretrained" else {t: pool.expert_encoder(t) for t in pool.tasks}
    return summarize(ctx.evaluate(encoder, pool.heads, taskpool, "test"))


def reference_rows(pool, taskpool, fingerprint: str, ctx: RunContext,
                   static: Mapping[str, tuple[Any, Any]] | None = None) -> dict[str, Any]:
    """``{name: {per_task, mean_accuracy[, hyperparameters]}}`` for ``pretrained``, ``individual`` and each
    ``static`` reference ``{name: (method, config)}``, on ``pool.tasks``; measured when the cache lacks them."""
    cached, fresh, rows = cached_rows(pool, fingerprint), {}, {}
    wanted = {"pretrained": (None, None), "individual": (None, None), **(static or {})}
    for name, (method, config) in wanted.items():
        entry, key = cached.get(name, {}), None if config is None else sha256_json(config)[:16]
        if not all(t in entry.get("per_task", {}) for t in pool.tasks) or entry.get("config") != key:
            entry = fresh[name] = {**measure(name, method, pool, taskpool, ctx), **({"config": key} if key else {})}
        rows[name] = summarize({t: entry["per_task"][t] for t in pool.tasks})
        if "hyperparameters" in entry:
            rows[name]["hyperparameters"] = entry["hyperparameters"]
    if fresh:
        path = default_cache_dir() / "reference" / f"{pool.content_key()}-{fingerprint}.json"
        atomic_write_json(path, {**cached, **fresh, "taskpool": taskpool.name, "taskpool_fingerprint": fingerprint})
    return rows
