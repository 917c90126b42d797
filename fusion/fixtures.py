"""Offline fixtures for the real-CLIP path: tiny, random, seeded stand-ins laid out like the real downloads.

``python -m fusion.fixtures OUT [--tasks mnist,eurosat,svhn,dtd] [--seed 0] [--train 48 --test 24]`` writes::

    OUT/data/<task>/                 datasets.DatasetDict.save_to_disk: the task's real split names, image /
                                     label columns, datasets.Image() pixels (mnist 28x28 "L", svhn 32x32 RGB,
                                     eurosat 64x64 RGB, dtd RGB of varying sizes, ...) and ClassLabel(names=...)
                                     with the shipped spec's classes (fusion/data/clip_task_specs.py)
    OUT/open_clip/pretrained/        an open_clip ``local-dir`` release (open_clip_config.json with model_cfg and
                                     preprocess_cfg, open_clip_model.safetensors): open_clip's own ViT-B-32
                                     config with the widths and depths shrunk (vision 64 wide, 2 layers; text 64
                                     wide, 1 layer; embed_dim 32), QuickGELU, 224 px / patch 32, 77 tokens and the
                                     real 49408-token vocabulary, so the real preprocessing and tokenizer apply
    OUT/open_clip/experts/<task>.*   θ0's image tower plus a seeded perturbation, in the layouts users' converted
                                     checkpoints have: whole-CLIP safetensors (``visual.*`` + text keys),
                                     visual-only safetensors, and a ``.pt`` ``{"state_dict": {"model.visual.*"}}``
    OUT/hf/pretrained/               the same weights as a transformers ``CLIPModel`` directory (like
                                     ``openai/clip-vit-base-patch32``; its text tower is random and unused by fusion)
    OUT/hf/experts/<task>/           ``CLIPVisionModel`` directories (like ``tanganke/clip-vit-base-patch32_<task>``):
                                     the same perturbations as the open_clip experts, minus ``proj`` (a
                                     CLIPVisionModel has no projection; the pool keeps θ0's)
    OUT/fixtures.json                the manifest, written last: tasks, seed, paths, expert files, per-task
                                     perturbation seeds and scales, and Hydra overrides

Point the README's real-CLIP commands (``fusion modelpool=clip-vit-b32_TA8 taskpool=clip_TA8 ...`` and
``modelpool=clip-vit-b32_hf_TA8``) at a build with the manifest's overrides: ``overrides.open_clip`` /
``overrides.hf`` list them (the tiny model, ``pretrained=null``, the experts, the data root, the task list and a
cache under OUT), and ``commands`` has them as whole shell commands to finish with a method::

    eval "$(jq -r .commands.open_clip OUT/fixtures.json) method=task_arithmetic"

``FUSION_CACHE=OUT/cache`` (in ``commands``; ``env`` in the manifest) keeps the zero-shot heads and decoded images
of the fixtures out of the user's cache. The expert dict is replaced with ``~modelpool.experts
+modelpool.experts={...}``: a plain ``modelpool.experts={...}`` override would be merged into the config's eight.

Expert ``k`` (position ``i`` in ``tasks``) is ``θ0 + s_i·N(0, 1)``: one ``torch.Generator`` seeded with
:func:`expert_seed` ``(seed, task)`` draws the noise key by key in sorted key order, and ``s_i = 0.01·(1 + i/2)``.
The build goes to a hidden folder next to OUT and is moved into place whole, so OUT is either absent, a previous
complete build, or this one. The same seed gives byte-identical weight files.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fusion.data.clip_task_specs import SPECS
from fusion.pools.hf_convert import open_clip_to_hf_clip_vision, strip_hf_prefix
from fusion.utils import atomic_save_safetensors, atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("mnist", "eurosat", "svhn", "dtd")
MANIFEST = "fixtures.json"
EXPERT_SCALE = 1e-2
# the real datasets' pixels: (PIL mode, (width, height)); None = sizes vary from image to image
IMAGE_LAYOUTS: dict[str, tuple[str, tuple[int, int] | None]] = {
    "mnist": ("L", (28, 28)), "fashion_mnist": ("L", (28, 28)), "kmnist": ("L", (28, 28)),
    "emnist_letters": ("L", (28, 28)), "fer2013": ("L", (48, 48)), "svhn": ("RGB", (32, 32)),
    "cifar10": ("RGB", (32, 32)), "cifar100": ("RGB", (32, 32)), "eurosat": ("RGB", (64, 64)),
    "pcam": ("RGB", (96, 96)), "stl10": ("RGB", (96, 96)), "resisc45": ("RGB", (256, 256)),
}
VARYING_SIZES = ((300, 220), (271, 300), (320, 240), (240, 256))
EXTRA_SPLITS = {"svhn": ("extra",)}  # splits the real dataset has besides train and test
# tasks whose class names come from the dataset's ClassLabel: how many classes the real one has
CLASSLABEL_SIZES = {"sun397": 397, "stanford_cars": 196, "cifar100": 100, "food101": 101}
TINY_SIZES = {"embed_dim": 32, "vision_cfg": {"width": 64, "layers": 2, "head_width": 32},
              "text_cfg": {"width": 64, "heads": 2, "layers": 1}}
PREPROCESS_CFG = {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
                  "interpolation": "bicubic", "resize_mode": "shortest"}  # open_clip's OpenAI preprocessing


# ------------------------------------------------------------------------------------------------- datasets
def label_names(task: str) -> tuple[str, ...]:
    """The ClassLabel names of ``task``'s fixture: the spec's class names, else placeholders of the real count."""
    if task not in SPECS:
        raise KeyError(f"no shipped spec for task '{task}'; known: {sorted(SPECS)}")
    names = SPECS[task].get("classnames")
    if names is not None:
        return tuple(names)
    return tuple(f"class_{i:03d}" for i in range(CLASSLABEL_SIZES[task]))


def split_names(task: str) -> tuple[str, ...]:
    """The real dataset's split names: train, the spec's test split, then any extra ones (svhn's ``extra``)."""
    return ("train", SPECS[task].get("test", "test"), *EXTRA_SPLITS.get(task, ()))


def class_images(rng: np.random.Generator, labels: np.ndarray, patterns: np.ndarray, mode: str,
                 size: tuple[int, int] | None, noise: int = 40) -> list:
    """One PIL image per label: the class's 4x4 pattern scaled up to the image size, plus uniform noise."""
    from PIL import Image

    images = []
    for label in labels:
        wh = size or VARYING_SIZES[int(rng.integers(len(VARYING_SIZES)))]
        pattern = patterns[int(label)] if mode == "RGB" else patterns[int(label), :, :, 0]
        base = np.asarray(Image.fromarray(pattern, mode).resize(wh, Image.NEAREST), dtype=np.int16)
        pixels = base + rng.integers(-noise, noise + 1, base.shape, dtype=np.int16)
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode))
    return images


def task_dataset(task: str, seed: int, n_train: int, n_test: int):
    """The fixture ``DatasetDict`` of ``task``: the spec's columns and splits, class-dependent random images."""
    import datasets

    spec, names = SPECS[task], label_names(task)
    image_column, label_column = spec.get("image_column", "image"), spec.get("label_column", "label")
    mode, size = IMAGE_LAYOUTS.get(task, ("RGB", None))
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    patterns = rng.integers(0, 256, (len(names), 4, 4, 3), dtype=np.uint8)
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.ClassLabel(names=list(names))})
    splits = {}
    for i, split in enumerate(split_names(task)):
        n = n_train if i == 0 else n_test
        labels = rng.permutation(np.arange(n) % len(names))
        splits[split] = datasets.Dataset.from_dict(
            {image_column: class_images(rng, labels, patterns, mode, size), label_column: labels.tolist()},
            features=features)
    return datasets.DatasetDict(splits)


# ------------------------------------------------------------------------------------------------ open_clip
SIZES = ("tiny", "vit-b-32")


def tiny_clip_config(size: str = "tiny") -> dict[str, Any]:
    """open_clip's ``ViT-B-32`` config with QuickGELU (as OpenAI's weights), shrunk to :data:`TINY_SIZES` for
    ``size="tiny"`` or at full size for ``"vit-b-32"`` (the GPU checks: 88M visual parameters)."""
    import open_clip

    if size not in SIZES:
        raise ValueError(f"fixture size must be one of {SIZES}, got {size!r}")
    cfg = open_clip.get_model_config("ViT-B-32")
    if cfg is None:
        raise KeyError("the installed open_clip has no ViT-B-32 config")
    cfg["quick_gelu"] = True
    if size == "tiny":
        cfg["embed_dim"] = TINY_SIZES["embed_dim"]
        for tower in ("vision_cfg", "text_cfg"):
            cfg[tower].update(TINY_SIZES[tower])
    return cfg


def tiny_clip(seed: int, model_cfg: Mapping[str, Any]) -> nn.Module:
    """A randomly initialised open_clip CLIP of ``model_cfg`` (seeded; the global RNG is left untouched)."""
    from open_clip.model import CLIP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIP(**model_cfg).eval()


def expert_seed(seed: int, task: str) -> int:
    """The seed of ``task``'s perturbation: crc32 of ``'fusion-fixtures:<seed>:<task>'``."""
    return zlib.crc32(f"fusion-fixtures:{seed}:{task}".encode())


def expert_scales(tasks: Sequence[str]) -> dict[str, float]:
    """``task -> EXPERT_SCALE·(1 + i/2)`` by position ``i``: task vectors of different sizes, as real ones."""
    return {task: EXPERT_SCALE * (1 + 0.5 * i) for i, task in enumerate(tasks)}


def perturbation(reference: Mapping[str, Tensor], seed: int, scale: float) -> dict[str, Tensor]:
    """``scale · N(0, 1)`` noise shaped like ``reference``, drawn key by key in sorted key order."""
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(reference[k].shape, generator=gen, dtype=reference[k].dtype)
            for k in sorted(reference)}


def expert_layouts(tasks: Sequence[str]) -> dict[str, str]:
    """How each open_clip expert is stored: the 2nd task ``visual`` (image tower only), the last of three or more
    ``pt`` (a ``.pt`` task-vectors ``ImageEncoder`` state dict), the others ``clip`` (whole-CLIP safetensors)."""
    layouts = {task: "clip" for task in tasks}
    if len(tasks) >= 2:
        layouts[tasks[1]] = "visual"
    if len(tasks) >= 3:
        layouts[tasks[-1]] = "pt"
    return layouts


def save_open_clip_expert(directory: Path, task: str, layout: str, visual: Mapping[str, Tensor],
                          clip_state: Mapping[str, Tensor]) -> str:
    """Write ``task``'s expert in ``layout``; returns its file name."""
    import io

    if layout == "pt":
        buffer = io.BytesIO()
        torch.save({"state_dict": {f"model.visual.{k}": v.contiguous() for k, v in visual.items()}}, buffer)
        atomic_write_bytes(directory / f"{task}.pt", buffer.getvalue())
        return f"{task}.pt"
    if layout == "clip":
        text = {k: v for k, v in clip_state.items() if not k.startswith("visual.")}
        state = {f"visual.{k}": v for k, v in visual.items()} | text
    else:
        state = dict(visual)
    # one metadata key only: safetensors writes several in a random order (then the bytes differ between builds)
    atomic_save_safetensors(directory / f"{task}.safetensors", state, {"format": "pt"})
    return f"{task}.safetensors"


def build_open_clip(root: Path, tasks: Sequence[str], seed: int, size: str = "tiny"
                    ) -> tuple[nn.Module, dict[str, dict[str, Tensor]], dict[str, str]]:
    """θ0 as a local-dir release under ``root/pretrained`` and the experts under ``root/experts``.

    Returns ``(θ0 CLIP, {task: perturbation of the visual keys}, {task: expert file name})``.
    """
    from fusion.pools.openclip import save_clip_dir

    model_cfg = tiny_clip_config(size)
    clip = tiny_clip(seed, model_cfg)
    save_clip_dir(clip, root / "pretrained", model_cfg, PREPROCESS_CFG)
    clip_state = clip.state_dict()
    theta0 = clip.visual.state_dict()
    deltas, files = {}, {}
    for task, layout in expert_layouts(tasks).items():
        deltas[task] = perturbation(theta0, expert_seed(seed, task), expert_scales(tasks)[task])
        visual = {k: theta0[k] + deltas[task][k] for k in theta0}
        files[task] = save_open_clip_expert(root / "experts", task, layout, visual, clip_state)
    return clip, deltas, files


# ------------------------------------------------------------------------------------------------------- HF
def hf_vision_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``CLIPVisionConfig`` keyword arguments of the open_clip tower in ``model_cfg`` (QuickGELU, as HF CLIP)."""
    vision = model_cfg["vision_cfg"]
    return {"hidden_size": vision["width"], "intermediate_size": int(vision["width"] * vision.get("mlp_ratio", 4.0)),
            "num_hidden_layers": vision["layers"], "num_attention_heads": vision["width"] // vision["head_width"],
            "image_size": vision["image_size"], "patch_size": vision["patch_size"],
            "projection_dim": model_cfg["embed_dim"], "hidden_act": "quick_gelu"}


def hf_text_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``CLIPTextConfig`` keyword arguments of the open_clip text tower's sizes (its weights are not converted)."""
    text = model_cfg["text_cfg"]
    return {"vocab_size": text["vocab_size"], "hidden_size": text["width"], "intermediate_size": 4 * text["width"],
            "num_hidden_layers": text["layers"], "num_attention_heads": text["heads"],
            "max_position_embeddings": text["context_length"], "projection_dim": model_cfg["embed_dim"],
            "hidden_act": "quick_gelu"}


def save_hf(model: nn.Module, directory: Path) -> Path:
    """``model.save_pretrained`` (the whole build is staged and moved into place by :func:`build_fixtures`)."""
    model.save_pretrained(str(directory))
    return directory


def save_hf_vision(config, state: Mapping[str, Tensor], directory: Path) -> Path:
    """A ``CLIPVisionModel`` directory as the hub's experts have it: ``config.json`` and a ``model.safetensors``
    with ``vision_model.*`` keys (transformers 5 ``save_pretrained`` drops that prefix; 4.x, which wrote the
    released experts, kept it, and both versions load either)."""
    config.save_pretrained(str(directory))
    atomic_save_safetensors(directory / "model.safetensors", state, {"format": "pt"})
    return directory


def build_hf(root: Path, visual: Mapping[str, Tensor], deltas: Mapping[str, Mapping[str, Tensor]],
             model_cfg: Mapping[str, Any], seed: int) -> dict[str, Path]:
    """θ0 as a ``CLIPModel`` directory ``root/pretrained`` and ``CLIPVisionModel`` experts ``root/experts/<task>``.

    Returns ``{task: expert directory}``.
    """
    try:
        import transformers
    except ImportError as e:
        raise ImportError("the HF fixtures need transformers: pip install 'fusion[transformers]' "
                          "(or build without them: --no-hf)") from e
    config = transformers.CLIPConfig(text_config=hf_text_config(model_cfg), vision_config=hf_vision_config(model_cfg),
                                     projection_dim=model_cfg["embed_dim"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pretrained = transformers.CLIPModel(config).eval()
    hf0 = open_clip_to_hf_clip_vision(visual)
    projection = hf0.pop("visual_projection.weight")
    with torch.no_grad():
        pretrained.vision_model.load_state_dict(strip_hf_prefix(hf0), strict=True)
        pretrained.visual_projection.weight.copy_(projection)
    save_hf(pretrained, root / "pretrained")
    vision_config = transformers.CLIPVisionConfig(**hf_vision_config(model_cfg), architectures=["CLIPVisionModel"])
    return {task: save_hf_vision(vision_config, open_clip_to_hf_clip_vision(
        {k: visual[k] + delta[k] for k in visual if k != "proj"}), root / "experts" / task)
        for task, delta in deltas.items()}


# -------------------------------------------------------------------------------------------------- manifest
def _hydra_value(value: str) -> str:
    """``value`` as a Hydra override value: bare when it is plain path characters, else single-quoted."""
    if re.fullmatch(r"[\w/.\-:+@~]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _hydra_dict(mapping: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"{k}: {_hydra_value(v)}" for k, v in mapping.items()) + "}"


def hydra_overrides(out: Path, tasks: Sequence[str], files: Mapping[str, str], hf: bool) -> dict[str, list[str]]:
    """Overrides turning ``modelpool=clip-vit-b32_TA8`` / ``clip-vit-b32_hf_TA8`` + ``taskpool=clip_TA8`` into the
    fixture run. ``~modelpool.experts`` first drops the config's eight experts (a dict override would merge)."""
    common = [f"modelpool.model={_hydra_value('local-dir:' + str(out / 'open_clip' / 'pretrained'))}",
              "modelpool.pretrained=null", f"modelpool.cache_dir={_hydra_value(str(out / 'cache'))}"]
    data = [f"taskpool.data_root={_hydra_value(str(out / 'data'))}", f"taskpool.tasks=[{','.join(tasks)}]"]
    overrides = {"open_clip": common + [
        f"modelpool.checkpoint_dir={_hydra_value(str(out / 'open_clip' / 'experts'))}",
        "~modelpool.experts", f"+modelpool.experts={_hydra_dict(files)}"] + data}
    if hf:
        experts = {task: str(out / "hf" / "experts" / task) for task in tasks}
        overrides["hf"] = common + [f"modelpool.pretrained_visual={_hydra_value(str(out / 'hf' / 'pretrained'))}",
                                    "~modelpool.experts", f"+modelpool.experts={_hydra_dict(experts)}"] + data
    return overrides


def manifest(out: Path, tasks: Sequence[str], seed: int, n_train: int, n_test: int, files: Mapping[str, str],
             hf: bool) -> dict[str, Any]:
    """The content of ``OUT/fixtures.json`` (absolute paths of the final location ``out``)."""
    overrides = hydra_overrides(out, tasks, files, hf)
    groups = {"open_clip": "modelpool=clip-vit-b32_TA8", "hf": "modelpool=clip-vit-b32_hf_TA8"}
    return {
        "version": 1, "tasks": list(tasks), "seed": seed, "n_train": n_train, "n_test": n_test, "root": str(out),
        "data_root": str(out / "data"), "splits": {task: list(split_names(task)) for task in tasks},
        "open_clip": {"model": f"local-dir:{out / 'open_clip' / 'pretrained'}",
                      "pretrained_dir": str(out / "open_clip" / "pretrained"),
                      "checkpoint_dir": str(out / "open_clip" / "experts"), "experts": dict(files),
                      "layouts": expert_layouts(tasks)},
        "hf": {"pretrained": str(out / "hf" / "pretrained"),
               "experts": {task: str(out / "hf" / "experts" / task) for task in tasks}} if hf else None,
        "expert_seeds": {task: expert_seed(seed, task) for task in tasks}, "expert_scales": expert_scales(tasks),
        "env": {"FUSION_CACHE": str(out / "cache")}, "overrides": overrides,
        "commands": {k: f"FUSION_CACHE={shlex.quote(str(out / 'cache'))} fusion {groups[k]} taskpool=clip_TA8 "
                        f"{shlex.join(v)}" for k, v in overrides.items()},
    }


# ----------------------------------------------------------------------------------------------------- build
def _check_target(out: Path) -> None:
    if out.exists() and not (out / MANIFEST).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not a fixtures build (no {MANIFEST}); refusing to replace it")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished build ``tmp`` to ``out``, replacing a previous build there."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
    os.replace(out, old / "build")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def build_into(tmp: Path, out: Path, tasks: Sequence[str], seed: int, n_train: int, n_test: int,
               hf: bool, size: str = "tiny") -> dict[str, Any]:
    """Write every fixture into ``tmp`` (paths in the manifest name ``out``); the manifest last."""
    for task in tasks:
        log.info("dataset %s", task)
        task_dataset(task, seed, n_train, n_test).save_to_disk(str(tmp / "data" / task))
    clip, deltas, files = build_open_clip(tmp / "open_clip", tasks, seed, size)
    if hf:
        build_hf(tmp / "hf", clip.visual.state_dict(), deltas, tiny_clip_config(size), seed)
    info = {**manifest(out, tasks, seed, n_train, n_test, files, hf), "size": size}
    atomic_write_json(tmp / MANIFEST, info)
    return info


def build_fixtures(out: str | Path, tasks: Sequence[str] = DEFAULT_TASKS, seed: int = 0, n_train: int = 48,
                   n_test: int = 24, hf: bool = True, size: str = "tiny") -> dict[str, Any]:
    """Build the fixtures under ``out`` (see the module docstring); returns the manifest (all paths absolute).

    Raises:
        FileExistsError: ``out`` exists, is not empty and holds no ``fixtures.json``.
        KeyError: a task without a shipped spec.
    """
    out = Path(out).expanduser().resolve()
    tasks = list(dict.fromkeys(tasks))
    if not tasks or n_train < 1 or n_test < 1:
        raise ValueError(f"need at least one task and one image per split (tasks={tasks}, n_train={n_train}, "
                         f"n_test={n_test})")
    for task in tasks:
        label_names(task)
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp."))
    try:
        info = build_into(tmp, out, tasks, seed, n_train, n_test, hf, size)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("fixtures for %s in %s", tasks, out)
    return info


def print_overrides(out: Path, kind: str) -> int:
    """Print ``overrides[kind]`` of the build at ``out``, shell-quoted on one line; 2 when there is no build."""
    path = Path(out).expanduser() / MANIFEST
    if not path.is_file():
        print(f"{path} not found: build the fixtures first with `python -m fusion.fixtures {out}`", file=sys.stderr)
        return 2
    print(shlex.join(json.loads(path.read_text())["overrides"][kind]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m fusion.fixtures OUT [--tasks a,b] [--seed S] [--train N --test M] [--no-hf]``."""
    import time

    from fusion.utils import configure_threads

    parser = argparse.ArgumentParser(prog="python -m fusion.fixtures", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated task names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=48, help="images in the train split")
    parser.add_argument("--test", type=int, default=24, help="images in the test (and any extra) split")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers checkpoints")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", choices=SIZES, default="tiny",
                        help="tiny (CI) or vit-b-32: the real ViT-B/32 sizes, random weights (GPU checks)")
    parser.add_argument("--overrides", choices=("open_clip", "hf"), default=None,
                        help="print the shell-quoted Hydra overrides of an existing build (for eval) and exit")
    args = parser.parse_args(argv)
    if args.overrides:
        return print_overrides(args.out, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    configure_threads(args.threads)
    start = time.time()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    info = build_fixtures(args.out, tasks, args.seed, args.train, args.test, hf=not args.no_hf, size=args.size)
    print(f"fixtures for {', '.join(info['tasks'])} in {info['root']} ({time.time() - start:.1f} s)")
    for name, command in info["commands"].items():
        print(f"  {name}: {command} method=<method>")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
