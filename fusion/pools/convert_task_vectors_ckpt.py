"""One-time conversion of the task-vectors paper's released checkpoints to safetensors.

Usage::

    python -m fusion.pools.convert_task_vectors_ckpt IN.pt OUT.safetensors [--trust]

``mlfoundations/task_vectors`` (Ilharco et al., 2023) released each fine-tuned encoder as a whole pickled
``src.modeling.ImageEncoder`` (``torch.save(module)``) whose ``.model`` is an open_clip CLIP. Reading such a
file means unpickling, and unpickling can run any code the file names. This command:

1. first tries ``torch.load(weights_only=True)`` with an allow-list (torch / torchvision / open_clip module
   classes and stand-ins for the paper's ``src.modeling`` classes): only those classes are rebuilt, no other
   code runs. A plain state dict, or a pickle made only of allowed classes, converts without ``--trust``;
2. otherwise refuses, unless ``--trust`` is given: then it loads with ``torch.load(weights_only=False)`` — the
   only place in fusion that does — standing in for classes that no longer exist (the paper's ``src.*``);
3. extracts the open_clip image tower (``model.visual.*`` and similar prefixes stripped) and writes it as
   safetensors, which :func:`fusion.pools.clip_pool.clip_pool` then reads without unpickling anything.

Use ``--trust`` only for files from a source you trust (check the printed sha256 against the publisher's).
"""
from __future__ import annotations

import argparse
import logging
import pickle
import sys
import types
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusion.pools.clip_pool import visual_state_dict
from fusion.utils import atomic_save_safetensors, sha256_file

log = logging.getLogger(__name__)

TRANSFORM_MODULES = ("torchvision.transforms", "open_clip.transform")
PAPER_CLASSES = ("src.modeling.ImageEncoder", "src.modeling.ClassificationHead", "src.modeling.ImageClassifier",
                 "src.modeling.MultiHeadImageClassifier")


class UntrustedCheckpointError(RuntimeError):
    """The checkpoint needs a full unpickle and ``--trust`` was not given."""


def _stand_in(module: str, name: str) -> type:
    """An empty ``nn.Module`` subclass that unpickles the state of a class that cannot be imported."""
    return type(name, (nn.Module,), {"__module__": module, "__doc__": f"stand-in for {module}.{name}"})


def _convert_to_rgb(image: Any) -> Any:
    return image.convert("RGB")


def _module_classes(*packages: types.ModuleType) -> list[type]:
    import inspect

    out = []
    for package in packages:
        for _, obj in inspect.getmembers(package, inspect.isclass):
            if issubclass(obj, nn.Module) or obj.__module__.startswith(TRANSFORM_MODULES):
                out.append(obj)
    return out


def allow_list() -> list[Any]:
    """Globals that ``weights_only=True`` may rebuild: module classes only (their ``__setstate__`` is benign)."""
    import open_clip.model
    import open_clip.transform
    import open_clip.transformer
    import torchvision.transforms.functional
    import torchvision.transforms.transforms

    allowed: list[Any] = _module_classes(nn.modules.activation, nn.modules.container, nn.modules.conv,
                                         nn.modules.dropout, nn.modules.linear, nn.modules.normalization,
                                         nn.modules.sparse, open_clip.model, open_clip.transformer,
                                         open_clip.transform, torchvision.transforms.transforms)
    allowed.append(torchvision.transforms.functional.InterpolationMode)
    # old open_clip pipelines hold this function (a reference only; it converts a PIL image to RGB)
    rgb = getattr(open_clip.transform, "_convert_to_rgb", _convert_to_rgb)
    allowed.append((rgb, "open_clip.transform._convert_to_rgb"))
    allowed += [(_stand_in(*c.rsplit(".", 1)), c) for c in PAPER_CLASSES]
    return allowed


def load_restricted(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with :func:`allow_list`; raises ``pickle.UnpicklingError`` if refused."""
    if not zipfile.is_zipfile(path):  # a bare pickle of numpy arrays (not torch.save) is read without torch
        from fusion.data.safe_unpickle import RestrictedUnpickler

        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="latin1").load()
        if isinstance(obj, Mapping):
            return {k: torch.as_tensor(v) for k, v in obj.items()}
    with torch.serialization.safe_globals(allow_list()):
        return torch.load(path, map_location="cpu", weights_only=True)


class _LenientUnpickler(pickle.Unpickler):
    """Resolves globals normally; a class that no longer imports (``src.modeling.*``) becomes a stand-in."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            log.warning("class %s.%s is not importable: unpickling its state into a stand-in module", module, name)
            return _stand_in(module, name)


def load_trusted(path: Path) -> Any:
    """Full unpickle (``weights_only=False``): runs whatever the file names. Only called with ``--trust``."""
    lenient = types.ModuleType("fusion_lenient_pickle")
    lenient.Unpickler = _LenientUnpickler
    lenient.load = lambda f, **kw: _LenientUnpickler(f, **kw).load()
    lenient.__dict__.update({k: getattr(pickle, k) for k in ("UnpicklingError", "HIGHEST_PROTOCOL")})
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=lenient)
    except RuntimeError as e:  # not torch.save's format: a bare pickle
        if "magic number" not in str(e):
            raise
    with open(path, "rb") as f:
        return _LenientUnpickler(f, encoding="latin1").load()


def to_state_dict(obj: Any, source: str) -> dict[str, Tensor]:
    """The flat tensors of a loaded object: a module's ``state_dict()`` or a (wrapped) state dict."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    for key in ("state_dict", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if isinstance(obj, Mapping):
        return {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    raise TypeError(f"{source}: cannot read tensors from a {type(obj).__module__}.{type(obj).__name__}")


def convert(src: str | Path, dst: str | Path, *, trust: bool = False) -> dict[str, Tensor]:
    """Convert ``src`` to a safetensors file of open_clip ``model.visual`` keys at ``dst``; returns the tensors."""
    src, dst = Path(src), Path(dst)
    try:
        obj = load_restricted(src)
        log.info("%s loaded with weights_only=True (no code from the file ran)", src)
    except pickle.UnpicklingError as e:
        if not trust:
            raise UntrustedCheckpointError(
                f"{src} is not a plain state dict: torch.load(weights_only=True) refused it ({_first_line(e)}).\n"
                "Loading it fully means unpickling, which can execute arbitrary code named in the file. Do it only "
                f"for a file from a source you trust (sha256 {sha256_file(src)}; compare it with the publisher's), "
                "by re-running with --trust. The result is a safetensors file that fusion loads without unpickling."
            ) from e
        log.warning("%s: full unpickle (weights_only=False) because --trust was given", src)
        obj = load_trusted(src)
    visual = {k: v.detach().clone().contiguous() for k, v in visual_state_dict(to_state_dict(obj, str(src)),
                                                                               str(src)).items()}
    atomic_save_safetensors(dst, visual, {"source": src.name, "converted_by": "fusion.pools.convert_task_vectors_ckpt"})
    log.info("wrote %d tensors (%.1fM parameters) to %s", len(visual), sum(v.numel() for v in visual.values()) / 1e6,
             dst)
    return visual


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    hint = next((s for s in lines if "GLOBAL" in s or "Unsupported" in s or "refused" in s), lines[0] if lines else "")
    return hint[:300]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion.pools.convert_task_vectors_ckpt",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint to convert (.pt: a pickled ImageEncoder or a state dict)")
    parser.add_argument("dst", help="output .safetensors holding the open_clip image tower")
    parser.add_argument("--trust", action="store_true",
                        help="allow a full unpickle (runs code named in the file) when the safe load refuses it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        convert(args.src, args.dst, trust=args.trust)
    except UntrustedCheckpointError as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
