"""Metadata (class names and CLIP-style caption templates) of the mini8 tasks."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TaskSpec", "MINI8_TASKS", "LATIN_CAPITALS", "GREEK_CAPITALS", "GREEK_NAMES", "split_sizes"]

SPLITS = ("train", "val", "test")


def split_sizes(n: int) -> dict[str, int]:
    """Split sizes for a task of ``n`` images: test = max(300, n//5), val = max(200, n//10), rest train."""
    test, val = max(300, n // 5), max(200, n // 10)
    if test + val >= n:
        raise ValueError(f"a task needs more than {test + val} images for the fixed val/test sizes, got {n}")
    return {"train": n - test - val, "val": val, "test": test}


@dataclass(frozen=True)
class TaskSpec:
    """One classification task: its name, class names (label order) and caption templates.

    Templates contain a single ``{}`` placeholder for the class name.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.classnames)) != len(self.classnames):
            raise ValueError(f"task {self.name!r}: duplicate class names in {self.classnames}")
        for template in self.templates:
            if template.count("{}") != 1:
                raise ValueError(f"task {self.name!r}: template {template!r} needs exactly one '{{}}'")

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classnames)

    def captions(self, label: int) -> list[str]:
        """All templates filled with the class name of ``label``."""
        return [t.format(self.classnames[label]) for t in self.templates]


DIGITS = tuple(str(i) for i in range(10))
LATIN_CAPITALS = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))
# U+0391..U+03A9 without the unassigned U+03A2 (there is no capital final sigma).
GREEK_CAPITALS = tuple(chr(c) for c in range(0x391, 0x3AA) if c != 0x3A2)
GREEK_NAMES = (
    "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta",
    "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi",
    "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega",
)  # fmt: skip
FASHION_NAMES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
# Label order of the animal-mnist 0.4 arrays (alphabetical, as listed in its README;
# checked visually: label 0 are bears, 9 are zebras).
ANIMAL_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
# Texture classes, in label order; the source image of each is in sources.TEXTURE_IMAGES.
TEXTURE_NAMES = (
    "brick wall", "grass", "gravel", "stars in deep space",
    "stained tissue", "printed text", "chalk handwriting", "coins",
)  # fmt: skip

_SPECS = (
    TaskSpec("mnist", DIGITS, (
        "a photo of the digit {}.", "a handwritten digit {}.",
        "a blurry photo of the number {}.", "a white handwritten {} on black.",
    )),
    TaskSpec("fashion", FASHION_NAMES, (
        "a photo of a {}.", "a grayscale photo of a {}.",
        "a low resolution photo of a {}.", "a product photo of a {}.",
    )),
    TaskSpec("animals", ANIMAL_NAMES, (
        "a silhouette of a {}.", "a black and white silhouette of a {}.",
        "the shape of a {}.", "a white silhouette of an animal: a {}.",
    )),
    TaskSpec("cvdigits", DIGITS, (
        "a scanned digit {}.", "a scan of the handwritten number {}.",
        "a small scanned image of the digit {}.",
    )),
    TaskSpec("skdigits", DIGITS, (
        "a tiny pixelated digit {}.", "a very low resolution digit {}.",
        "an 8x8 pixel image of the number {}.",
    )),
    TaskSpec("letters", LATIN_CAPITALS, (
        "a drawing of the letter {}.", "the capital letter {}.",
        "a rendering of the letter {} in some font.", "a rotated letter {}.",
    )),
    TaskSpec("greek", GREEK_NAMES, (
        "the greek letter {}.", "a drawing of the greek capital letter {}.",
        "the uppercase greek letter {} in some font.",
    )),
    TaskSpec("textures", TEXTURE_NAMES, (
        "a texture of {}.", "a close-up photo of {}.",
        "a grayscale patch of {}.", "a small crop of {}.",
    )),
)  # fmt: skip

MINI8_TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _SPECS}
