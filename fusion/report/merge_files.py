"""The files a learned merge leaves in its run directory, written from its :class:`MergeRecord`, and their readers.

=================================  ===================================================================
``<parameters_file>.safetensors``  ``record.trainable`` (``merge_parameters``; phase 1 of Concrete AdaMerging:
                                   ``mask_logits``), metadata: tasks and tensor names
``coefficients.json`` + ``.png``   ``record.coefficients`` (λ as used in the merge) and their heatmap
``mask.safetensors`` + ``.png``    ``record.mask`` (bit-packed when binary, else float32) and the kept fraction per
                                   tensor (:func:`read_mask` reads it back, e.g. for ``method.mask_checkpoint``)
``routing.json`` + ``.png``        ``record.routing``: mean routing weight per task and expert
``routed_model/``                  ``record.routers`` + ``record.routed_spec`` (:func:`read_routed` rebuilds it)
=================================  ===================================================================

With a ``suffix`` (``.last_good``, after a divergence) the tensors and JSON are written, no plots.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from fusion.errors import ConfigError, MissingFileError
from fusion.merge.masks import hard_mask, is_binary, pack_bits, unpack_bits
from fusion.param.contract import MergeRecord
from fusion.param.routed import RoutedEncoder, routed_from_spec
from fusion.report import plots
from fusion.utils import atomic_save_safetensors, atomic_write_json, read_json, read_safetensors

MASK_FORMAT = "fusion-concrete-mask/1"
ROUTED_CONFIG, ROUTERS = "routed_config.json", "routers.safetensors"


def write_merge_record(record: MergeRecord, out: Path, tasks: Sequence[str], suffix: str = "") -> dict[str, Any]:
    """Write every file ``record`` holds into ``out`` (see the module docstring); returns what results.json
    records about them (the mask's summary and file names, the routing files), ``{}`` when nothing."""
    meta = {"tasks": json.dumps(list(tasks)), "tensor_names": json.dumps(record.tensor_names)}
    if record.trainable:
        atomic_save_safetensors(out / f"{record.parameters_file}{suffix}.safetensors", record.trainable, meta)
    if record.coefficients is not None:
        write_coefficients(record, out, tasks, suffix)
    described: dict[str, Any] = {}
    if record.mask is not None:
        described = write_mask_files(record, out, suffix)
    if record.routers is not None and not suffix:
        described = write_routed_files(record, out, tasks)
    return described


def write_coefficients(record: MergeRecord, out: Path, tasks: Sequence[str], suffix: str) -> None:
    values = record.coefficients.detach()
    atomic_write_json(out / f"coefficients{suffix}.json",
                      {"tasks": list(tasks), "tensor_names": record.tensor_names, "lambdas": values.tolist()})
    if not suffix:
        plots.coefficient_heatmap(values, tasks, out / "coefficients.png", title=f"{record.title}: learned λ")


def write_mask_files(record: MergeRecord, out: Path, suffix: str) -> dict[str, Any]:
    """``mask{suffix}.safetensors`` (and, without suffix, the kept-fraction plot); returns the mask's summary."""
    info = dict(record.mask_info)
    meta = {k: json.dumps(v) for k, v in info.items()}
    info["file"] = write_mask(out / f"mask{suffix}.safetensors", record.mask, meta).name
    if not suffix:
        hard = {n: hard_mask(x) for n, x in (record.mask_logits or {}).items()}
        title = f"{record.title}: Concrete mask ({info.get('eval_mask')} eval mask)"
        info["plot"] = plots.mask_kept_fraction(record.mask, hard, out / "mask_kept_fraction.png", title).name
    return info


def write_routed_files(record: MergeRecord, out: Path, tasks: Sequence[str]) -> dict[str, Path]:
    """``routing.json`` and its heatmap (when the routing was measured) and ``routed_model/``."""
    described = {}
    if record.routing is not None:
        atomic_write_json(out / "routing.json", {"tasks": list(tasks), "mean_routing_weight": record.routing.tolist()})
        described["routing_plot"] = plots.routing_heatmap(record.routing, tasks, out / "routing.png")
    directory = out / "routed_model"
    atomic_save_safetensors(directory / ROUTERS, record.routers, {"format": "fusion-routed/1"})
    atomic_write_json(directory / ROUTED_CONFIG, record.routed_spec)
    described["routed_model"] = directory
    return described


def write_mask(path: str | Path, masks: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Save a mask ``{name: Tensor[*shape]}``: bit-packed ``uint8`` when binary, else float32 (exact).

    The metadata records the format, the encoding, the tensor names and shapes, plus ``metadata``.
    """
    binary = all(is_binary(m) for m in masks.values())
    tensors = {n: pack_bits(m) if binary else m.detach().float() for n, m in masks.items()}
    meta = {**(metadata or {}), "format": MASK_FORMAT, "encoding": "packbits" if binary else "float32",
            "names": json.dumps(list(masks)), "shapes": json.dumps({n: list(m.shape) for n, m in masks.items()})}
    return atomic_save_safetensors(path, tensors, meta)


def read_mask(path: str | Path, task_vectors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A mask saved by :func:`write_mask`, checked against stacked task vectors ``{name: Tensor[K, *shape]}``.

    An unreadable file is a :class:`fusion.errors.CorruptFileError` naming it; a file that is not a mask, or a mask
    that does not fit the pool, a :class:`fusion.errors.ConfigError` naming the tensor and both shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no mask file at {path} (written as mask.safetensors in a Concrete run's directory)")
    meta = read_safetensors(path, metadata=True)
    if meta.get("format") != MASK_FORMAT:
        raise ConfigError(f"{path} is not a Concrete mask file (metadata format={meta.get('format')!r})")
    shapes = {n: tuple(s) for n, s in json.loads(meta["shapes"]).items()}
    missing, extra = [n for n in task_vectors if n not in shapes], [n for n in shapes if n not in task_vectors]
    if missing or extra:
        raise ConfigError(f"mask {path} does not match the pool: {len(missing)} pool tensors missing "
                          f"(first {missing[:2]}), {len(extra)} unknown (first {extra[:2]})")
    for name, t in task_vectors.items():
        if shapes[name] != tuple(t.shape[1:]):
            raise ConfigError(f"mask {path}: tensor '{name}' has shape {shapes[name]} but the pool's parameter has "
                              f"shape {tuple(t.shape[1:])}; the mask was learned on a different architecture")
    raw = read_safetensors(path)
    if meta["encoding"] == "packbits":
        return {n: unpack_bits(raw[n], shapes[n]) for n in task_vectors}
    return {n: raw[n].float().reshape(shapes[n]) for n in task_vectors}


def read_routed(directory: str | Path, base: nn.Module, task_vectors: Mapping[str, Tensor]) -> RoutedEncoder:
    """Rebuild the routed model a run wrote to ``directory`` (``<run dir>/routed_model``) over ``base`` and the same
    task vectors; returned in eval mode."""
    directory = Path(directory)
    config = directory / ROUTED_CONFIG
    if not config.is_file():
        raise MissingFileError(f"no {ROUTED_CONFIG} in {directory} (a WEMoE/SMEAR run writes <run dir>/routed_model)")
    return routed_from_spec(read_json(config), base, task_vectors, read_safetensors(directory / ROUTERS), where=str(directory))
