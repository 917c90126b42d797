"""Static (data-free) merges: ``θ = θ_0 + fn(τ; hyperparameters)``, optionally tuned on the validation split.

``fn`` is a pure function from :mod:`fusion.merge` given by Hydra with ``_partial_: true``. With ``tune`` set,
every combination of the grid is scored by mean accuracy on the labeled *validation* split (never on test),
and the best is used; results.json records the grid, the scores and that they came from validation.
"""
from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fusion.errors import ConfigError
from fusion.merge.task_vectors import StateDict, add_delta
from fusion.methods.base import MergedStart, MergeOutcome, RunContext
from fusion.pools.openclip import copy_with_state, freeze

log = logging.getLogger(__name__)


def merged_encoder(pool, delta: Mapping[str, Any]):
    """A frozen copy of the pool's encoder holding ``θ_0 + delta``."""
    return freeze(copy_with_state(pool.encoder, add_delta(pool.pretrained_state(), delta)))


def as_partial(fn: Callable) -> functools.partial:
    """``fn`` as a ``functools.partial`` (Hydra's ``_partial_: true`` gives one; a plain function gets one without
    keywords), whose ``keywords`` are the default hyperparameters."""
    return fn if isinstance(fn, functools.partial) else functools.partial(fn)


def grid(space: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of a ``{name: values}`` grid, in order."""
    names = list(space)
    return [dict(zip(names, values)) for values in itertools.product(*(space[n] for n in names))]


def grid_accuracy(space: Mapping[str, Sequence[Any]], accuracy: Callable[[dict[str, Any]], dict[str, float]],
                  name: str, split: str) -> list[tuple[dict[str, Any], dict[str, float]]]:
    """``(candidate, {task: accuracy})`` for every combination of ``space``, ``accuracy(candidate)`` measured on
    the labeled ``split``; each candidate's mean is logged. The one validation grid search of the static merges."""
    results = []
    for candidate in grid(space):
        acc = accuracy(candidate)
        results.append((candidate, acc))
        log.info("%s %s: %s mean accuracy %.4f", name, candidate, split, sum(acc.values()) / len(acc))
    return results


class StaticMerge:
    """A data-free merge ``fn(τ, **hyperparameters)``; ``tune`` = ``{name: [values]}`` grid on ``tune_split``.

    ``postprocess`` (e.g. LiNeS' :func:`fusion.merge.lines.lines_scale`) maps the merged update to a new one;
    tune its arguments with ``postprocess.<arg>`` keys in ``tune``. ``fn`` and ``postprocess`` are functions or
    (Hydra ``_partial_``) partials whose keywords are the default hyperparameters. As a learned method's ``init``
    it gives its tuned ``lam`` (``init_as: lam``) or its merged vector (``init_as: merged_vector``, and whenever
    it has no λ).
    """

    def __init__(self, fn: Callable[..., StateDict], name: str | None = None,
                 tune: Mapping[str, Sequence[Any]] | None = None, tune_split: str = "val",
                 postprocess: Callable[..., StateDict] | None = None, init_as: str = "lam"):
        if tune_split == "test":
            raise ConfigError("tune_split='test' would tune on test labels; use the validation split ('val')")
        self.fn, self.tune_split = as_partial(fn), tune_split
        self.postprocess = None if postprocess is None else as_partial(postprocess)
        self.tune = {k: list(v) for k, v in (tune or {}).items()}
        self.name = name or self.fn.func.__name__
        if init_as not in ("lam", "merged_vector"):
            raise ConfigError(f"method '{self.name}': init_as must be 'lam' or 'merged_vector', got {init_as!r}")
        self.init_as = init_as

    def defaults(self) -> dict[str, Any]:
        post = {f"postprocess.{k}": v for k, v in (self.postprocess.keywords if self.postprocess else {}).items()}
        return {**self.fn.keywords, **post}

    def merge(self, tv, hparams: Mapping[str, Any]) -> StateDict:
        """``postprocess(fn(τ, **h), **h_post)`` with ``h_post`` the ``postprocess.*`` entries of ``hparams``."""
        own = {k: v for k, v in hparams.items() if not k.startswith("postprocess.")}
        delta = self.fn(tv, **own)
        if self.postprocess is None:
            return delta
        post = {k.split(".", 1)[1]: v for k, v in hparams.items() if k.startswith("postprocess.")}
        return self.postprocess(delta, **post)

    def select(self, pool, taskpool, tv, ctx: RunContext) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The hyperparameters to use and the tuning record (None when not tuned)."""
        if not self.tune:
            return self.defaults(), None
        unknown = [k for k in self.tune if k not in self.defaults()]
        if unknown:
            raise ConfigError(f"method '{self.name}': tune keys {unknown} are not arguments set on fn "
                              f"({sorted(self.defaults())}); add them to fn or fix tune")
        def accuracy(candidate):
            delta = self.merge(tv, {**self.defaults(), **candidate})
            return ctx.evaluate(merged_encoder(pool, delta), pool.heads, taskpool, self.tune_split)

        scores = [{**candidate, "mean_accuracy": sum(acc.values()) / len(acc)}
                  for candidate, acc in grid_accuracy(self.tune, accuracy, self.name, self.tune_split)]
        best = max(scores, key=lambda s: s["mean_accuracy"])
        chosen = {**self.defaults(), **{k: best[k] for k in self.tune}}
        return chosen, {"on": self.tune_split, "grid": self.tune, "scores": scores, "best": best}

    def run(self, pool, taskpool, ctx: RunContext) -> MergeOutcome:
        tv = pool.task_vectors()
        hparams, tuning = self.select(pool, taskpool, tv, ctx)
        encoder = merged_encoder(pool, self.merge(tv, hparams))
        return MergeOutcome(encoder, {"hyperparameters": hparams, "tuning": tuning},
                            protocol="static merge" + (f"; hyperparameters tuned on the labeled {self.tune_split} split"
                                                       if tuning else "; default hyperparameters, no data"))

    def initial_coefficient(self, pool, taskpool, ctx: RunContext) -> tuple[float | MergedStart, dict[str, Any] | None]:
        """The (tuned) ``lam`` of this merge, used to initialise learned coefficients; a merge without ``lam``
        (TSV-M, Iso-C/CTS), or one configured with ``init_as: merged_vector`` (its λ scales something other than
        Σ_k τ_k: MagMax, WUDI), gives its merged vector instead (:class:`MergedStart`)."""
        tv = pool.task_vectors()
        hparams, tuning = self.select(pool, taskpool, tv, ctx)
        if "lam" not in hparams or self.init_as == "merged_vector":
            return MergedStart(self.merge(tv, hparams), self.name), tuning
        return float(hparams["lam"]), tuning
