"""The Hydra entry point ``fusion-merge`` (conf/stream.yaml): a static merge of HF checkpoint directories or peft
LoRA adapters, streamed tensor by tensor (:mod:`fusion.stream`)::

    fusion-merge method=ties base=DIR experts=[DIR1,DIR2] output=OUT
    fusion-merge method=dare method.fn.p=0.7 base=org/model experts=[A,B] output=OUT max_shard_size=5GB device=cuda

A second entry module beside :mod:`fusion.app` (the only other one that knows Hydra) because ``fusion.app`` imports
Lightning, open_clip and the data stack, which a checkpoint merge needs none of. The method is
``conf/method/<name>.yaml``'s ``fn`` with its default hyperparameters; its ``tune`` grid needs labeled validation
data and is ignored with a warning; methods without a pure ``fn`` (data-based, learned) are refused.
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fusion.errors import ConfigError, report_user_errors

log = logging.getLogger("fusion")
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def merge_checkpoints(cfg: DictConfig) -> Path:
    """Stream ``cfg.method.fn`` over ``cfg.base`` and ``cfg.experts`` into ``cfg.output``; returns the output."""
    from fusion.stream import stream_merge
    from fusion.utils import resolve_device

    missing = [key for key in ("base", "experts", "output") if OmegaConf.is_missing(cfg, key)]
    if missing:
        raise ConfigError(f"fusion-merge needs {missing}: fusion-merge method=ties base=DIR experts=[DIR1,DIR2] "
                          "output=NEW_DIR (directories written by save_pretrained, or peft LoRA adapters)")
    name = cfg.method.get("name", "?")
    if cfg.method.get("fn") is None:
        raise ConfigError(f"method '{name}' ({cfg.method.get('_target_')}) is not a data-free static merge (it has "
                          "no pure `fn`); fusion-merge streams only those: data-based and learned merges need the "
                          "experts in memory and task data, run them with `fusion`")
    if cfg.method.get("postprocess") is not None:
        raise ConfigError(f"method '{name}': postprocess (LiNeS) scales by depth over the whole model and is not "
                          "streamed; drop method/postprocess")
    fn = instantiate(cfg.method.fn)
    if cfg.method.get("tune"):
        log.warning("method '%s': its tune grid %s needs labeled validation data and is ignored; merging with the "
                    "defaults %s (set method.fn.<name>=value to change them)", name,
                    OmegaConf.to_container(cfg.method.tune), fn.keywords)
    experts = list(cfg.experts) if OmegaConf.is_list(cfg.experts) else [cfg.experts]
    out = stream_merge(fn, cfg.base, experts, cfg.output, method=name, max_shard_size=cfg.max_shard_size,
                       device=str(resolve_device(cfg.device, source="device")))
    log.info("merged %d experts with %s into %s", len(experts), name, out)
    return out


@hydra.main(config_path=CONF_DIR, config_name="stream", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    """Console entry point ``fusion-merge``."""
    merge_checkpoints(cfg)


if __name__ == "__main__":
    main()
