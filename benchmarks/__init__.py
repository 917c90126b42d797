"""Benchmarks of fusion; scripts run as ``python benchmarks/<name>.py`` from the repository root."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def default_mini8_pool():
    """The mini8 pool of the recipe in ``conf/modelpool/mini8.yaml`` (built and cached on first use)."""
    from omegaconf import OmegaConf

    from fusion.pools.mini8 import mini8_pool

    return mini8_pool(OmegaConf.load(ROOT / "conf" / "modelpool" / "mini8.yaml").recipe)
