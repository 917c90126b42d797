"""Build and load "mini8": eight offline 32x32 grayscale classification tasks.

Each task is saved as a ``datasets.DatasetDict`` (splits ``train``/``val``/``test``,
features ``image: Image()`` (PIL mode "L", 32x32) and ``label: ClassLabel``) under
``<root>/<task>/``; ``<root>/manifest.json`` records class names, caption templates,
split counts and the sha256 of every raw source. Build with::

    python -m fusion.data.mini8 [--root DIR] [--fetch]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from fusion.utils import EtaLog

from .cache import atomic_write_text, default_cache_dir
from .sources import (
    fetch_sources, load_animals, load_cvdigits, load_fashion, load_greek, load_letters,
    load_mnist, load_skdigits, load_textures, task_sources, verify_sources,
)  # fmt: skip
from .render import font_group_names
from .tasks import GREEK_CAPITALS, LATIN_CAPITALS, MINI8_TASKS, SPLITS, split_sizes

__all__ = ["VERSION", "Mini8NotBuiltError", "default_root", "build_mini8", "load_mini8", "read_manifest", "main"]

log = logging.getLogger(__name__)

VERSION = "mini8-v1"
MANIFEST = "manifest.json"
BUILD_COMMAND = "python -m fusion.data.mini8 --fetch"  # also installed as `fusion-build-mini8`
GROUP_SPLIT_TRIES = 256  # seeded group assignments tried for font tasks; least discarded wins

Splits = dict[str, np.ndarray]  # split name -> indices into the task's arrays


class Mini8NotBuiltError(FileNotFoundError):
    """The mini8 data (or some task of it) is not built at the requested root."""


def default_root(subset: int | None = None) -> Path:
    """``<cache>/mini8/v1`` (``v1-subset{n}`` for subset builds)."""
    return default_cache_dir() / "mini8" / ("v1" if subset is None else f"v1-subset{subset}")


def _task_rng(seed: int, task: str) -> np.random.Generator:
    """A generator that depends only on the build seed and the task name."""
    return np.random.default_rng([seed, zlib.crc32(task.encode())])


# ----------------------------------------------------------------------------- splitting


def stratified_split(labels: np.ndarray, rng: np.random.Generator) -> Splits:
    """Seeded class-stratified split with the fixed sizes of :func:`tasks.split_sizes`."""
    from sklearn.model_selection import train_test_split

    sizes = split_sizes(len(labels))
    idx = np.arange(len(labels))
    state = int(rng.integers(2**31 - 1))
    rest, test = train_test_split(idx, test_size=sizes["test"], stratify=labels, random_state=state)
    train, val = train_test_split(rest, test_size=sizes["val"], stratify=labels[rest], random_state=state + 1)
    return {"train": np.asarray(train), "val": np.asarray(val), "test": np.asarray(test)}


def _assign_groups(order: np.ndarray, counts: np.ndarray, sizes: dict[str, int]) -> dict[str, list[int]]:
    """Greedily give whole groups (in ``order``) to test, then val, the rest to train."""
    taken: dict[str, list[int]] = {"test": [], "val": [], "train": []}
    totals = {"test": 0, "val": 0}
    for g in order:
        split = next((s for s in ("test", "val") if totals[s] < sizes[s]), "train")
        taken[split].append(int(g))
        if split != "train":
            totals[split] += int(counts[g])
    return taken


def group_split(labels: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> tuple[Splits, dict]:
    """Split by group (font design): no group is in two splits.

    Test/val get whole groups until they reach the fixed sizes, then are trimmed to them
    (surplus images of held-out groups are dropped, never moved to train). Of
    GROUP_SPLIT_TRIES seeded group orders the one discarding the fewest images is used.
    """
    sizes = split_sizes(len(labels))
    counts = np.bincount(groups)
    best = None
    for _ in range(GROUP_SPLIT_TRIES):
        taken = _assign_groups(rng.permutation(len(counts)), counts, sizes)
        waste = sum(int(counts[taken[s]].sum()) - sizes[s] for s in ("test", "val"))
        if taken["train"] and (best is None or waste < best[0]):
            best = (waste, taken)
    if best is None:
        raise ValueError(f"cannot split {len(counts)} groups into train/val/test of sizes {sizes}")
    splits = {}
    for split, members in best[1].items():
        idx = rng.permutation(np.flatnonzero(np.isin(groups, members)))
        splits[split] = idx[: sizes[split]] if split != "train" else idx
    return splits, {s: sorted(best[1][s]) for s in SPLITS}


def fixed_split(split_ids: np.ndarray, rng: np.random.Generator) -> Splits:
    """Splits given per image (index into SPLITS), shuffled within each split."""
    return {s: rng.permutation(np.flatnonzero(split_ids == i)) for i, s in enumerate(SPLITS)}


# ----------------------------------------------------------------------------- per-task build


def _load_task(task: str, files: dict[str, Path], seed: int) -> tuple[np.ndarray, np.ndarray, Splits, dict]:
    """Load ``task``'s arrays and split them. Returns (images, labels, splits, extra manifest info)."""
    rng = _task_rng(seed, task)
    first = next(iter(files.values()))
    if task in ("letters", "greek"):
        images, labels, groups = (load_letters if task == "letters" else load_greek)(seed)
        splits, members = group_split(labels, groups, rng)
        names = font_group_names(LATIN_CAPITALS if task == "letters" else GREEK_CAPITALS)
        info = {s: [names[g] for g in members[s]] for s in SPLITS}
        return images, labels, splits, {"split_by": "font design group", "font_groups": info}
    if task == "textures":
        images, labels, split_ids = load_textures(first.parent, seed)
        return images, labels, fixed_split(split_ids, rng), {"split_by": "disjoint image bands"}
    loaders: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
        "mnist": lambda: load_mnist(first),
        "fashion": lambda: load_fashion(first.parent, seed),
        "animals": lambda: load_animals(first),
        "cvdigits": lambda: load_cvdigits(first),
        "skdigits": load_skdigits,
    }
    images, labels = loaders[task]()
    return images, labels, stratified_split(labels, rng), {"split_by": "stratified random"}


def _png(image: np.ndarray) -> dict[str, Any]:
    """Encode one uint8 [32,32] array as a PNG for the ``datasets.Image`` feature."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _to_dataset_dict(task: str, images: np.ndarray, labels: np.ndarray, splits: Splits):
    """Build the task's ``DatasetDict`` from arrays and split indices."""
    import datasets

    features = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=list(MINI8_TASKS[task].classnames)),
    })  # fmt: skip
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict(
            {"image": [_png(images[i]) for i in idx], "label": labels[idx].tolist()}, features=features)
        for split, idx in splits.items()
    })  # fmt: skip


def _save_atomically(dd: Any, target: Path) -> None:
    """``save_to_disk`` into a temp dir next to ``target`` (no progress bars), then swap it in."""
    from datasets.utils import logging as ds_logging

    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        dd.save_to_disk(str(tmp))
    finally:
        if bars:
            ds_logging.enable_progress_bar()
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _build_task(task: str, root: Path, files: dict[str, Path], seed: int, subset: int | None) -> dict:
    """Build one task under ``root/task`` and return its manifest entry."""
    start = time.perf_counter()
    images, labels, splits, extra = _load_task(task, files, seed)
    spec = MINI8_TASKS[task]
    if labels.min() < 0 or labels.max() >= spec.num_classes:
        raise ValueError(f"task {task!r}: labels out of range 0..{spec.num_classes - 1}")
    if subset is not None:
        splits = {s: idx[:subset] for s, idx in splits.items()}
    _save_atomically(_to_dataset_dict(task, images, labels, splits), root / task)
    counts = {s: int(len(splits[s])) for s in SPLITS}
    log.info("built %s: %s in %.1fs", task, counts, time.perf_counter() - start)
    return {"classnames": list(spec.classnames), "templates": list(spec.templates), "counts": counts, **extra}


# ----------------------------------------------------------------------------- public API


def read_manifest(root: Path) -> dict | None:
    """The manifest at ``root``, or None if there is none."""
    path = Path(root) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _same_config(manifest: dict | None, seed: int, subset: int | None) -> bool:
    """True if ``manifest`` was written by a build with this version, seed and subset."""
    return manifest is not None and (
        (manifest.get("version"), manifest.get("seed"), manifest.get("subset")) == (VERSION, seed, subset))


def _is_built(manifest: dict | None, root: Path, seed: int, subset: int | None, tasks: Sequence[str]) -> bool:
    """True if ``manifest`` matches this build's config and has every task on disk."""
    return _same_config(manifest, seed, subset) and all(
        t in manifest["tasks"] and (root / t / "dataset_dict.json").is_file() for t in tasks)  # type: ignore[index]


def _check_tasks(tasks: Sequence[str] | None) -> list[str]:
    """Validate task names; default to all mini8 tasks, in canonical order."""
    names = list(MINI8_TASKS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in MINI8_TASKS]
    if unknown:
        raise KeyError(f"unknown mini8 task(s) {unknown}; known: {list(MINI8_TASKS)}")
    return [t for t in MINI8_TASKS if t in names]


def build_mini8(
    root: Path | None = None,
    *,
    seed: int = 0,
    subset: int | None = None,
    tasks: Sequence[str] | None = None,
    fetch: bool = False,
    strict: bool = True,
    cache_dir: Path | None = None,
) -> Path:
    """Build the mini8 tasks under ``root`` (default :func:`default_root`) and return ``root``.

    Args:
        seed: seed of every subset/split/render choice.
        subset: keep at most this many images per task per split (for tests).
        tasks: task names (default all eight).
        fetch: first download/extract missing sources (and apt-get install as root).
        strict: raise if a source's sha256 differs from the recorded one (else record it).
        cache_dir: where downloaded sources live (``<cache_dir>/sources``; default cache).

    Idempotent: returns at once if the manifest has the same version/seed/subset and
    every requested task is on disk; missing tasks are built and merged in.
    """
    if subset is not None and subset < 1:
        raise ValueError(f"subset must be a positive int, got {subset}")
    root = Path(root) if root is not None else default_root(subset)
    names = _check_tasks(tasks)
    manifest = read_manifest(root)
    if _is_built(manifest, root, seed, subset, names):
        log.debug("mini8 already built at %s", root)
        return root
    if fetch:
        fetch_sources(cache_dir, allow_install=True, tasks=names)
    if not _same_config(manifest, seed, subset):
        manifest = {"version": VERSION, "seed": seed, "subset": subset, "tasks": {}, "sources": {}}
    todo = [t for t in names if not _is_built(manifest, root, seed, subset, [t])]
    files = {t: task_sources(t, cache_dir) for t in todo}  # raises MissingSourceError early
    for t in todo:
        manifest["sources"].update(verify_sources(files[t], strict=strict))
    root.mkdir(parents=True, exist_ok=True)
    _write_manifest(root, manifest)  # drops a stale manifest of another config before any task dir changes
    eta = EtaLog(len(todo), "mini8 data build", log)
    for t in todo:
        manifest["tasks"][t] = _build_task(t, root, files[t], seed, subset)
        _write_manifest(root, manifest)
        eta.advance(1, f"task {t}")
    return root


def _write_manifest(root: Path, manifest: dict) -> None:
    """Atomically write ``manifest`` (tasks in canonical order) to ``root/manifest.json``."""
    manifest["tasks"] = {t: manifest["tasks"][t] for t in MINI8_TASKS if t in manifest["tasks"]}
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def load_mini8(root: Path | None = None, tasks: Sequence[str] | None = None) -> dict:
    """Load built tasks as ``{task: datasets.DatasetDict}`` (canonical task order)."""
    import datasets

    root = Path(root) if root is not None else default_root()
    names = _check_tasks(tasks)
    manifest = read_manifest(root)
    missing = names if manifest is None else [
        t for t in names if t not in manifest["tasks"] or not (root / t / "dataset_dict.json").is_file()]
    if missing:
        raise Mini8NotBuiltError(
            f"mini8 task(s) {missing} not built at {root}; build with: {BUILD_COMMAND} --root {root}")
    return {t: datasets.load_from_disk(str(root / t)) for t in names}


# ----------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fusion-build-mini8", description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=None, help="output dir (default <cache>/mini8/v1)")
    p.add_argument("--fetch", action="store_true", help="download/extract missing sources first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset", type=int, default=None, help="max images per task per split")
    p.add_argument("--tasks", nargs="+", default=None, choices=list(MINI8_TASKS))
    p.add_argument("--no-strict", dest="strict", action="store_false", help="record changed source checksums")
    p.add_argument("-q", "--quiet", action="store_true")
    g = p.add_argument_group("pretraining mini8's CLIP (the shipped base of every mini8 pool)")
    g.add_argument("--pretrain", action="store_true",
                   help="re-create the released mini8 CLIP from its card's recipe and report whether it hashes the same")
    g.add_argument("--out", type=Path, default=None, help="release dir (default <cache>/mini8-clip/<recipe hash>)")
    g.add_argument("--recipe", type=Path, default=None, help="a JSON recipe (default: the shipped card's)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (CUDA when present)")
    return p.parse_args(argv)


def _print_summary(root: Path, seconds: float) -> None:
    """Print per-task split counts (rich table if available)."""
    manifest = read_manifest(root) or {"tasks": {}}
    rows = [(t, *(str(e["counts"][s]) for s in SPLITS), str(len(e["classnames"])))
            for t, e in manifest["tasks"].items()]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        for row in rows:
            print("\t".join(row))
    else:
        table = Table("task", *SPLITS, "classes", title=f"mini8 at {root} ({seconds:.1f}s)")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    print(f"mini8 at {root} ({seconds:.1f}s)")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: build mini8 and print a summary."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    root = build_mini8(args.root, seed=args.seed, subset=args.subset, tasks=args.tasks,
                       fetch=args.fetch, strict=args.strict)
    _print_summary(root, time.perf_counter() - start)
    if args.pretrain:
        from fusion.errors import user_error_types
        from fusion.pools.mini8_pretrain import rebuild_release

        try:
            print(rebuild_release(args.out, args.recipe, args.device))
        except user_error_types() as err:
            if os.environ.get("FUSION_DEBUG"):
                raise
            print(f"fusion-build-mini8: error: {err}\n(set FUSION_DEBUG=1 for the traceback)", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
