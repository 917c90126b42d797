"""Probe a mini8 recipe: fine-tune the eight experts from a pretrained CLIP and measure how the pool merges.

    python benchmarks/mini8_recipe_probe.py --base fusion/assets/mini8_clip --out /tmp/probe [--finetune lr=5e-4] \
        [--methods task_arithmetic adamerging_layer_wise] [--threads 2]
    python benchmarks/mini8_recipe_probe.py --checkpoint WORK/ckpt.pt --model fusion-mini8-vit-l8 --out /tmp/probe

``--base`` is a release (``fusion-build-mini8 --pretrain``); ``--checkpoint`` a pretraining checkpoint under way
(``<release>/work/ckpt.pt``), so a recipe can be judged before its pretraining ends. ``--finetune KEY=VALUE``
overrides ``recipe.finetune`` (or a top-level recipe key such as ``max_logit_scale``) of
``conf/modelpool/mini8.yaml`` (``steps_scale=2`` multiplies every task's steps).
The pool is built with the library's builder (:func:`fusion.pools.mini8.finetune_pool`, diagnostics included) into
``--out/pool``; each ``--methods`` entry then runs through ``fusion.app.train`` on it. Prints one summary and
writes ``--out/probe.json``. Used to choose recipe v4 (``docs/mini8.md``); decisions read validation numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def probe_recipe(overrides: list[str]) -> dict:
    from omegaconf import OmegaConf

    recipe = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "modelpool" / "mini8.yaml").recipe)
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "steps_scale":
            recipe["finetune"]["steps"] = {t: round(s * float(value)) for t, s in recipe["finetune"]["steps"].items()}
        elif key in recipe["finetune"]:
            recipe["finetune"][key] = parse_value(value)
        elif key in recipe and key != "finetune":
            recipe[key] = parse_value(value)
        else:
            raise SystemExit(f"--finetune {item}: no key '{key}' in the recipe or recipe.finetune")
    return recipe


def load_clip(args):
    import open_clip
    import torch

    from fusion.pools.mini8_base import load_base
    from fusion.pools.openclip import create_clip, model_config

    if args.base:
        return load_base(args.base), open_clip.get_tokenizer(f"local-dir:{args.base}"), \
            json.loads((Path(args.base) / "open_clip_config.json").read_text())["model_cfg"]
    clip = create_clip(args.model)
    clip.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True)["clip"])
    return clip.eval(), open_clip.get_tokenizer(args.model), model_config(args.model)


def run_method(spec: str, pool_dir: Path, out: Path, threads: int) -> dict:
    from hydra import compose, initialize_config_dir

    from fusion.app import train

    method, *overrides = spec.split()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={method}", *overrides, "modelpool=dir",
                                           f"modelpool.directory={pool_dir}", f"output_dir={out}", "logger=none",
                                           "print_table=false", "trainer.enable_progress_bar=false",
                                           f"num_threads={threads}"])
    return train(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--base", type=Path, help="a mini8 CLIP release directory")
    source.add_argument("--checkpoint", type=Path, help="a pretraining checkpoint (ckpt.pt)")
    parser.add_argument("--model", default="fusion-mini8-vit-l8", help="the architecture of --checkpoint")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--finetune", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--methods", nargs="*", default=["task_arithmetic", "adamerging_layer_wise"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from fusion.data.taskpool import mini8_taskpool
    from fusion.pools.mini8 import finetune_pool
    from fusion.utils import atomic_write_json, configure_threads

    configure_threads(args.threads)
    recipe = probe_recipe(args.finetune)
    pool_dir = args.out / "pool"
    if not (pool_dir / "manifest.json").is_file():
        clip, tokenize, model_cfg = load_clip(args)
        finetune_pool(clip, tokenize, model_cfg, pool_dir, mini8_taskpool(), recipe,
                      {"name": "mini8-probe", "pool_hash": f"probe-{args.out.name}",
                       "probe_of": str(args.base or args.checkpoint)})
    manifest = json.loads((pool_dir / "manifest.json").read_text())
    results = {spec: run_method(spec, pool_dir, args.out / "runs" / spec.replace(" ", "__"), args.threads)
               for spec in args.methods}
    atomic_write_json(args.out / "probe.json", {"recipe": recipe, "manifest": manifest, "results": {
        s: {"per_task": r["per_task"], "mean_accuracy": r["mean_accuracy"]} for s, r in results.items()}})
    print(summary(manifest, results))


def summary(manifest: dict, results: dict) -> str:
    acc, diag = manifest["accuracy"], manifest["diagnostics"]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = [f"test: zero-shot {pct(acc['test']['pretrained']['mean_accuracy'])}, experts "
             f"{pct(acc['test']['individual']['mean_accuracy'])}; "
             + ", ".join(f"{s} {pct(r['mean_accuracy'])}" for s, r in results.items()),
             f"val: task arithmetic λ={diag['task_arithmetic']['lambda']} grid "
             + " ".join(f"{k}:{pct(v)}" for k, v in diag["task_arithmetic"]["grid"].items()),
             "task       ZS   expert  α.25  α.5  α.75 | TA low-H third  high-H third"]
    for t, curve in diag["alpha_curves"].items():
        st = diag["task_arithmetic"]["per_task"][t]
        lines.append(f"{t:9s} {pct(acc['val']['pretrained']['per_task'][t]):>5} {pct(curve['1']):>6} "
                     f"{pct(curve['0.25']):>5} {pct(curve['0.5']):>5} {pct(curve['0.75']):>5} | "
                     f"{pct(st['low_entropy_accuracy']):>5} {pct(st['high_entropy_accuracy']):>5}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
