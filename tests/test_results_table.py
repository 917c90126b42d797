"""The README's mini8 results are tied to the pool recipe they were measured on.

The brief's rule for the shared mini8 recipe: change it only with a version bump, then re-measure every README row.
These tests turn a silent recipe change (or a hand-edited table) into a failure that says what to re-run.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fusion.data.mini8 import VERSION as DATA_VERSION
from fusion.pools.mini8 import POOL_VERSION, pool_key

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASK_ID_MARK = " (task id at inference)"  # benchmarks/mini8_table.py's row_label


def configured_pool_hash() -> str:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config")
    recipe = OmegaConf.to_container(cfg.modelpool.recipe, resolve=True)
    return pool_key(recipe, DATA_VERSION)


def readme_results_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index('<a id="results"></a>')
    return text[start:text.index('<a id="', start + 1)]


def test_every_measured_row_is_from_the_configured_pool():
    rows = json.loads((RESULTS / "mini8.json").read_text())
    expected = configured_pool_hash()
    stale = sorted(spec for spec, row in rows.items() if row["pool_hash"] != expected)
    assert len(rows) >= 20 and not stale, (
        f"benchmarks/results/mini8.json rows {stale} were measured on another pool than conf/modelpool/mini8.yaml "
        f"builds ({expected}); bump POOL_VERSION and re-run them with benchmarks/mini8_table.py")


def test_readme_table_is_the_measured_table_and_names_its_pool():
    section = readme_results_section()
    table = (RESULTS / "mini8.md").read_text().strip()
    assert table in section, "README results table differs from benchmarks/results/mini8.md: run " \
                             "`python benchmarks/mini8_table.py --table-only` and paste its table"
    named = set(re.findall(r"hash `([0-9a-f]{12})`", section))
    assert named == {configured_pool_hash()}, f"README results name pool(s) {named}; conf/modelpool/mini8.yaml builds " \
                                              f"{configured_pool_hash()}"
    assert f"`{POOL_VERSION}`" in section
    # every row of the JSON is in the table, and the table holds nothing else but the reference rows
    rows = json.loads((RESULTS / "mini8.json").read_text())
    names = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    marked = {spec + TASK_ID_MARK if row.get("inference") == "task id" else spec for spec, row in rows.items()}
    assert sorted(set(names) - {"pretrained (zero-shot)", "individual experts"}) == sorted(marked)


def test_every_method_config_has_a_measured_row():
    rows = json.loads((RESULTS / "mini8.json").read_text())
    missing = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml") if p.stem not in rows)
    assert not missing, f"conf/method/ configs without a mini8 row: {missing}; run " \
                        f"`python benchmarks/mini8_table.py {' '.join(missing)}`"
