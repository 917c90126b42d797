"""Render glyph-classification tasks (Latin / Greek capitals) from the system's fonts.

Fonts are scanned under ``/usr/share/fonts`` (Debian packages fonts-noto-core,
fonts-urw-base35, fonts-freefont-ttf, fonts-liberation, fonts-dejavu). A font is
used for a character set only if

* its Unicode cmap maps every character, to a glyph whose name (when it has a
  meaningful one) is that character's name — this drops symbol fonts that put
  dingbats or Greek at Latin code points (D050000L, Standard Symbols PS);
* no character renders empty, as the font's ``.notdef`` box, or as a copy of
  another character of the set;
* it is not a near-exact copy of an earlier font (e.g. Noto Sans Symbols'
  Latin letters are Noto Sans').

Each kept font gets a *design group* (metric clones such as Liberation Sans,
Nimbus Sans and FreeSans share one) so train/val/test can be split by group.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .cache import sha256_file

__all__ = [
    "FontInfo", "FONT_DIRS", "candidate_fonts", "select_fonts", "font_group_names",
    "render_glyph_task", "font_set_sha256",
]  # fmt: skip

log = logging.getLogger(__name__)

FONT_DIRS: tuple[Path, ...] = (Path("/usr/share/fonts"),)
FONT_SUFFIXES = (".ttf", ".otf")
GLYPH_PX = 64  # font size used for the high-resolution glyph master
CANVAS_PX = 32
NOTDEF_PROBE = "\uffff"  # a noncharacter: every font renders it as .notdef (or nothing)
DUPLICATE_TOL = 2.0  # mean abs difference (0..255) below which two fonts count as copies

# Families that are metric clones of one design share a group (so they never straddle splits).
GROUP_RULES: tuple[tuple[str, str], ...] = (
    (r"^(Nimbus Sans|Liberation Sans|FreeSans|Arial|Helvetica)", "helvetica-arial"),
    (r"^(Nimbus Roman|Liberation Serif|FreeSerif|Times)", "times"),
    (r"^(Nimbus Mono|Liberation Mono|FreeMono|Courier)", "courier"),
    (r"^DejaVu Sans", "dejavu-sans"),
    (r"^DejaVu (Serif|Math)", "dejavu-serif"),
    (r"^Noto Serif", "noto-serif"),
    (r"^Noto ", "noto-sans"),  # script fonts (Symbols, Nushu, Elbasan...) reuse Noto Sans Latin/Greek
)


@dataclass(frozen=True)
class FontInfo:
    """A usable font file with its family name and design group."""

    path: Path
    family: str
    group: str


def design_group(family: str) -> str:
    """Map a family name to its design group (clone families share one)."""
    for pattern, group in GROUP_RULES:
        if re.match(pattern, family):
            return group
    return family.lower()


def _font_paths(font_dirs: Sequence[Path]) -> list[Path]:
    """All .ttf/.otf files below ``font_dirs``, sorted for determinism."""
    paths: list[Path] = []
    for root in font_dirs:
        if root.is_dir():
            paths.extend(p for p in root.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.is_file())
    return sorted(paths)


def _glyph_name_ok(glyph: str, char: str) -> bool:
    """True if a glyph name denotes ``char`` (AGL name, ``uniXXXX``, or the Unicode-name word)."""
    from fontTools import agl

    base = glyph.split(".")[0]
    if agl.toUnicode(base) == char:
        return True
    word = unicodedata.name(char, "").split(" ")[-1]
    return base.lower() == word.lower()  # e.g. 'Omega' / 'Delta' for the Greek capitals


def _cmap_family(path: Path, chars: Sequence[str]) -> str | None:
    """The family name if the font's cmap covers ``chars`` with sane glyph names, else None."""
    from fontTools.ttLib import TTFont

    try:
        font = TTFont(path, lazy=True, fontNumber=0)
        cmap = font.getBestCmap() or {}
        ok = all(ord(c) in cmap and _glyph_name_ok(cmap[ord(c)], c) for c in chars)
        name = font["name"]
        family = name.getDebugName(16) or name.getDebugName(1) or path.stem
        font.close()
    except Exception as exc:  # unreadable font file: skip it, do not fail the build
        log.debug("skipping unreadable font %s: %s", path, exc)
        return None
    return family if ok else None


def candidate_fonts(chars: Sequence[str], font_dirs: Sequence[Path] = FONT_DIRS) -> list[FontInfo]:
    """Fonts whose cmap covers every character of ``chars`` (before render checks)."""
    return list(_candidate_fonts(tuple(chars), tuple(font_dirs)))


@lru_cache(maxsize=8)
def _candidate_fonts(chars: tuple[str, ...], font_dirs: tuple[Path, ...]) -> tuple[FontInfo, ...]:
    found = []
    for path in _font_paths(font_dirs):
        family = _cmap_family(path, chars)
        if family is not None:
            found.append(FontInfo(path=path, family=family, group=design_group(family)))
    return tuple(found)


def font_set_sha256(fonts: Sequence[FontInfo], root: Path = FONT_DIRS[0]) -> str:
    """A single sha256 over the (relative path, file sha256) list of ``fonts``."""
    digest = hashlib.sha256()
    for info in sorted(fonts, key=lambda f: str(f.path)):
        rel = info.path.relative_to(root) if info.path.is_relative_to(root) else info.path
        digest.update(f"{rel}\t{sha256_file(info.path)}\n".encode())
    return digest.hexdigest()


def _render_master(font: ImageFont.FreeTypeFont, char: str) -> Image.Image | None:
    """Render ``char`` white-on-black at GLYPH_PX and crop to its ink; None if empty."""
    size = GLYPH_PX * 3
    image = Image.new("L", (size, size), 0)
    ImageDraw.Draw(image).text((size // 2, size // 2), char, font=font, fill=255, anchor="mm")
    bbox = image.getbbox()
    return image.crop(bbox) if bbox else None


def _signature(glyph: Image.Image) -> np.ndarray:
    """A 16x16 float thumbnail used to compare glyph designs between fonts."""
    return np.asarray(glyph.resize((16, 16), Image.Resampling.BILINEAR), dtype=np.float32)


def _blob(glyph: Image.Image) -> bytes:
    """Exact identity of a rendered glyph (size + pixels)."""
    return f"{glyph.size}".encode() + glyph.tobytes()


def _font_masters(info: FontInfo, chars: Sequence[str]) -> list[Image.Image] | None:
    """Glyph masters of ``chars`` in one font, or None if any is empty, .notdef or repeated."""
    font = ImageFont.truetype(str(info.path), GLYPH_PX)
    masters = [_render_master(font, c) for c in chars]
    if any(m is None for m in masters):
        return None
    notdef = _render_master(font, NOTDEF_PROBE)
    blobs = [_blob(m) for m in masters]  # type: ignore[arg-type]
    if notdef is not None and _blob(notdef) in blobs:
        return None
    if len(set(blobs)) != len(blobs):
        return None
    return masters  # type: ignore[return-value]


@lru_cache(maxsize=8)
def _select(chars: tuple[str, ...], font_dirs: tuple[Path, ...]) -> tuple[tuple[FontInfo, list[Image.Image]], ...]:
    """Usable fonts for ``chars`` with their glyph masters, near-duplicates removed (cached)."""
    kept: list[tuple[FontInfo, list[Image.Image]]] = []
    sigs: list[np.ndarray] = []
    rejected = duplicates = 0
    for info in candidate_fonts(chars, font_dirs):
        masters = _font_masters(info, chars)
        if masters is None:
            rejected += 1
            continue
        sig = np.stack([_signature(m) for m in masters])
        if any(np.abs(sig - other).mean() < DUPLICATE_TOL for other in sigs):
            duplicates += 1
            continue
        kept.append((info, masters))
        sigs.append(sig)
    log.info("fonts for %r: %d kept, %d failed render checks, %d near-duplicates dropped",
             "".join(chars), len(kept), rejected, duplicates)
    return tuple(kept)


def select_fonts(chars: Sequence[str], font_dirs: Sequence[Path] = FONT_DIRS) -> tuple[FontInfo, ...]:
    """Fonts that pass all coverage/render checks for ``chars``, near-duplicates removed."""
    return tuple(info for info, _ in _select(tuple(chars), tuple(font_dirs)))


def font_group_names(chars: Sequence[str], font_dirs: Sequence[Path] = FONT_DIRS) -> list[str]:
    """Sorted design-group names of the fonts used for ``chars`` (group id = list index)."""
    return sorted({f.group for f in select_fonts(chars, font_dirs)})


def _jitter_glyph(master: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """One 32x32 render of a glyph master: rotation ±15°, size 18..28 px, shift ±3 px."""
    angle = rng.uniform(-15.0, 15.0)
    side = rng.uniform(18.0, 28.0)
    shift = rng.uniform(-3.0, 3.0, size=2)
    rotated = master.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=0)
    scale = side / max(rotated.size)
    w, h = (max(1, round(d * scale)) for d in rotated.size)
    small = rotated.resize((w, h), Image.Resampling.BILINEAR)
    x = int(np.clip(round((CANVAS_PX - w) / 2 + shift[0]), 0, CANVAS_PX - w))
    y = int(np.clip(round((CANVAS_PX - h) / 2 + shift[1]), 0, CANVAS_PX - h))
    canvas = Image.new("L", (CANVAS_PX, CANVAS_PX), 0)
    canvas.paste(small, (x, y))
    return np.asarray(canvas, dtype=np.uint8)


def renders_per_font(num_fonts: int, num_classes: int, target_total: int) -> int:
    """Renders per (font, class) so the task has about ``target_total`` images."""
    return max(1, round(target_total / max(1, num_fonts * num_classes)))


def render_glyph_task(
    chars: Sequence[str], seed: int, *, target_total: int = 5000, font_dirs: Sequence[Path] = FONT_DIRS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[FontInfo, ...]]:
    """Render a glyph task: one class per character.

    Returns ``(images uint8 [N,32,32], labels int64 [N], groups int64 [N], fonts)`` where
    ``groups[i]`` indexes the sorted list of distinct design groups of ``fonts``.
    """
    selected = _select(tuple(chars), tuple(font_dirs))
    fonts = tuple(info for info, _ in selected)
    if not fonts:
        raise RuntimeError(f"no font under {[str(d) for d in font_dirs]} covers all of {''.join(chars)!r}")
    reps = renders_per_font(len(fonts), len(chars), target_total)
    group_names = font_group_names(chars, font_dirs)
    rng = np.random.default_rng(seed)
    images, labels, groups = [], [], []
    for info, masters in selected:
        for label, master in enumerate(masters):
            images.extend(_jitter_glyph(master, rng) for _ in range(reps))
            labels.extend([label] * reps)
            groups.extend([group_names.index(info.group)] * reps)
    return np.stack(images), np.asarray(labels, np.int64), np.asarray(groups, np.int64), fonts
