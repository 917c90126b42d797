"""The CLIP image-classification benchmarks as data: HF dataset, columns, splits, class names, templates.

TA8 (Ilharco et al., 2023, "Editing models with task arithmetic"): sun397 … dtd. TALL14 / TALL20 (Wang et al.,
2024, "Localizing task information for improved model merging and compression", arXiv:2405.07813) add six and
then six more tasks, in FusionBench's order (``config/taskpool/CLIPVisionModelTaskPool/*TALL20.yaml``).

Dataset names are those FusionBench loads (``tanganke/*`` re-uploads where it uses them; the canonical hub
names otherwise). Class names follow the CLIP paper's prompt-engineering notebook for TA8; for the TALL
extensions they are FusionBench's strings, since its (B)-family experts were fine-tuned against heads built
from exactly those (odd ones included). ``None`` class names are read from the label's ``ClassLabel``
feature (sun397, stanford_cars, cifar100, food101: CLIP uses the dataset's own names there), optionally
cleaned (``_`` and ``/`` to spaces). Templates are CLIP's per-dataset ones, written out from the notebook
(resisc45 and cifar keep CLIP's full 18 so the heads match those the experts were fine-tuned with).
Every entry can be overridden per task in ``conf/taskpool/*.yaml`` (``overrides.<task>.<key>``).
"""
from __future__ import annotations

from typing import Any

TA8 = ("sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
TALL14 = TA8 + ("oxford_flowers102", "pcam", "fer2013", "oxford_iiit_pet", "stl10", "cifar100")
TALL20 = TALL14 + ("cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered_sst2")


def _articles(prefixes: tuple[str, ...], suffix: str) -> tuple[str, ...]:
    """``'<prefix> {}<suffix>'`` with no article, then 'a', then 'the' (CLIP's resisc45 / cifar pattern)."""
    return tuple(f"{p} {a}{{}}{suffix}" for a in ("", "a ", "the ") for p in prefixes)


_CIFAR_TEMPLATES = tuple(t.format(article=a) for a in ("a", "the") for t in (
    "a photo of {article} {{}}.", "a blurry photo of {article} {{}}.", "a black and white photo of {article} {{}}.",
    "a low contrast photo of {article} {{}}.", "a high contrast photo of {article} {{}}.",
    "a bad photo of {article} {{}}.", "a good photo of {article} {{}}.", "a photo of {article} small {{}}.",
    "a photo of {article} big {{}}."))
_DIGITS = tuple(str(i) for i in range(10))

GTSRB = (
    "red and white circle 20 kph speed limit", "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit", "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit", "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit", "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit", "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing", "red and white triangle road intersection warning",
    "white and yellow diamond priority road", "red and white upside down triangle yield right-of-way", "stop",
    "empty red and white circle", "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry", "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning", "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning", "red and white triangle with snowflake / ice warning",
    "red and white triangle with deer warning", "white circle with gray strike bar no speed limit",
    "blue circle with white right turn arrow mandatory", "blue circle with white left turn arrow mandatory",
    "blue circle with white forward arrow mandatory", "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory", "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory", "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
)  # fmt: skip
RESISC45 = (
    "airplane", "airport", "baseball diamond", "basketball court", "beach", "bridge", "chaparral", "church",
    "circular farmland", "cloud", "commercial area", "dense residential", "desert", "forest", "freeway",
    "golf course", "ground track field", "harbor", "industrial area", "intersection", "island", "lake", "meadow",
    "medium residential", "mobile home park", "mountain", "overpass", "palace", "parking lot", "railway",
    "railway station", "rectangular farmland", "river", "roundabout", "runway", "sea ice", "ship", "snowberg",
    "sparse residential", "stadium", "storage tank", "tennis court", "terrace", "thermal power station", "wetland",
)  # fmt: skip
EUROSAT = (
    "annual crop land", "forest", "brushland or shrubland", "highway or road",
    "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
    "residential buildings or homes or apartments", "river", "lake or sea",
)  # fmt: skip
DTD = (
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched",
    "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy", "grid", "grooved", "honeycombed",
    "interlaced", "knitted", "lacelike", "lined", "marbled", "matted", "meshed", "paisley", "perforated", "pitted",
    "pleated", "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled", "sprinkled", "stained",
    "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven", "wrinkled", "zigzagged",
)  # fmt: skip
FLOWERS102 = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold", "tiger lily",
    "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot", "king protea",
    "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink-yellow dahlia?", "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush",
    "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania",
    "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily",
    "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)  # fmt: skip
PETS = (
    "abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "bengal", "birman",
    "bombay", "boxer", "british_shorthair", "chihuahua", "egyptian_mau", "english_cocker_spaniel", "english_setter",
    "german_shorthaired", "great_pyrenees", "havanese", "japanese_chin", "keeshond", "leonberger", "maine_coon",
    "miniature_pinscher", "newfoundland", "persian", "pomeranian", "pug", "ragdoll", "russian_blue", "saint_bernard",
    "samoyed", "scottish_terrier", "shiba_inu", "siamese", "sphynx", "staffordshire_bull_terrier",
    "wheaten_terrier", "yorkshire_terrier",
)  # fmt: skip

_A_THE = ("a photo of a {}.", "a photo of the {}.")
_NUMBER = ('a photo of the number: "{}".',)

# task -> spec; keys: hf (hub id), config, classnames (None = ClassLabel), clean, templates, test (split name),
# image_column / label_column (default image / label)
SPECS: dict[str, dict[str, Any]] = {
    "sun397": dict(hf="tanganke/sun397", classnames=None, clean=True, templates=_A_THE),
    "stanford_cars": dict(hf="tanganke/stanford_cars", classnames=None, templates=(
        "a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!", "a photo of my dirty {}.",
        "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}.")),
    "resisc45": dict(hf="tanganke/resisc45", classnames=RESISC45, templates=_articles(
        ("satellite imagery of", "aerial imagery of", "satellite photo of", "aerial photo of", "satellite view of",
         "aerial view of"), ".")),
    "eurosat": dict(hf="tanganke/eurosat", classnames=EUROSAT, templates=(
        "a centered satellite photo of {}.", "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.")),
    "svhn": dict(hf="ufldl-stanford/svhn", config="cropped_digits", classnames=_DIGITS, templates=_NUMBER),
    "gtsrb": dict(hf="tanganke/gtsrb", classnames=GTSRB, templates=(
        'a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
        'a close up photo of a "{}" traffic sign.')),
    "mnist": dict(hf="ylecun/mnist", classnames=_DIGITS, templates=_NUMBER),
    "dtd": dict(hf="tanganke/dtd", classnames=DTD, templates=tuple(
        f"a photo of {a} {{}} {w}." for a in ("a", "the") for w in ("texture", "pattern", "thing", "object"))),
    # TALL14 additions
    "oxford_flowers102": dict(hf="dpdl-benchmark/oxford_flowers102", classnames=FLOWERS102,
                              templates=("a photo of a {}, a type of flower.",)),
    "pcam": dict(hf="1aurent/PatchCamelyon", classnames=("lymph node", "lymph node containing metastatic tumor tissue"),
                 templates=("this is a photo of {}",)),
    "fer2013": dict(hf="clip-benchmark/wds_fer2013", image_column="jpg", label_column="cls",
                    classnames=("angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised"),
                    templates=("a photo of a {} looking face.", "a photo of a face showing the emotion: {}.",
                               "a photo of a face looking {}.", "a face that looks {}.", "they look {}.",
                               "look at how {} they are.")),
    "oxford_iiit_pet": dict(hf="timm/oxford-iiit-pet", classnames=PETS, templates=("a photo of a {}, a type of pet.",)),
    "stl10": dict(hf="tanganke/stl10", classnames=("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey",
                                                   "ship", "truck"), templates=_A_THE),
    "cifar100": dict(hf="tanganke/cifar100", classnames=None, clean=True, templates=_CIFAR_TEMPLATES),
    # TALL20 additions
    "cifar10": dict(hf="tanganke/cifar10", classnames=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                       "horse", "ship", "truck"), templates=_CIFAR_TEMPLATES),
    "food101": dict(hf="ethz/food101", test="validation", classnames=None, clean=True,
                    templates=("a photo of {}, a type of food.",)),
    "fashion_mnist": dict(hf="zalando-datasets/fashion_mnist", classnames=(
        "T - shirt / top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        templates=_A_THE),
    "emnist_letters": dict(hf="tanganke/emnist_letters", classnames=tuple(chr(c) for c in range(65, 91)),
                           templates=('a photo of the digit character: "{}".',)),
    "kmnist": dict(hf="tanganke/kmnist", classnames=tuple("おきすつなはまやれを"),
                   templates=("a photo of the character {}.",)),
    "rendered_sst2": dict(hf="nateraw/rendered-sst2", classnames=("negative", "positive"),
                          templates=("a {} review of a movie.",)),
}
