"""fusion.fixtures: offline stand-ins for the real-CLIP downloads, checked against the shipped specs and loaders."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fusion.data.clip_task_specs import SPECS
from fusion.fixtures import build_fixtures

pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]
TASKS = ["mnist", "eurosat", "svhn", "dtd"]
# what the real hub datasets hold (dataset cards of ylecun/mnist, tanganke/eurosat, ufldl-stanford/svhn, tanganke/dtd)
REAL_SPLITS = {"mnist": {"train", "test"}, "eurosat": {"train", "test"}, "svhn": {"train", "test", "extra"},
               "dtd": {"train", "test"}}
REAL_PIXELS = {"mnist": ("L", {(28, 28)}), "eurosat": ("RGB", {(64, 64)}), "svhn": ("RGB", {(32, 32)})}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(root, manifest)`` of one default build (seed 0, 48 train / 24 test images); caches under the tmp dir."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FUSION_CACHE", str(tmp_path_factory.mktemp("fusion-cache")))
    root = tmp_path_factory.mktemp("fx") / "out"
    info = build_fixtures(root, TASKS, seed=0, n_train=48, n_test=24)
    yield root, info
    mp.undo()


def weight_files(root: Path) -> dict[str, bytes]:
    """The bytes of every weight file of a build (not the heads other tests cached under ``root/cache``)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.suffix in (".safetensors", ".pt") and p.relative_to(root).parts[0] != "cache"}


# ------------------------------------------------------------------------------------------------- datasets
def test_datasets_match_the_shipped_specs(built):
    import datasets

    root, info = built
    assert sorted(p.name for p in (root / "data").iterdir()) == sorted(TASKS) == sorted(info["tasks"])
    for task in TASKS:
        spec = SPECS[task]
        data = datasets.load_from_disk(str(root / "data" / task))
        assert isinstance(data, datasets.DatasetDict) and set(data) == REAL_SPLITS[task], task
        label = datasets.ClassLabel(names=list(spec["classnames"]))
        want = datasets.Features({spec.get("image_column", "image"): datasets.Image(),
                                  spec.get("label_column", "label"): label})
        for name, split in data.items():
            assert split.features == want and split.column_names == list(want), (task, name)
            assert len(split) == (48 if name == "train" else 24)
            assert split.features["label"].num_classes == len(spec["classnames"])
        modes = {im.mode for im in data["test"]["image"]}
        sizes = {im.size for im in data["test"]["image"]}
        if task in REAL_PIXELS:
            assert (modes, sizes) == ({REAL_PIXELS[task][0]}, REAL_PIXELS[task][1]), task
        else:  # dtd: RGB photos of varying sizes
            assert modes == {"RGB"} and len(sizes) > 1 and min(min(s) for s in sizes) >= 200


def test_images_are_class_dependent(built):
    """A nearest-class-mean classifier on raw pixels separates the classes (noise is smaller than the patterns)."""
    import datasets

    for task in ("mnist", "eurosat"):
        data = datasets.load_from_disk(str(built[0] / "data" / task))
        x = {s: np.stack([np.asarray(im, dtype=np.float32).ravel() for im in data[s]["image"]]) for s in data}
        y = {s: np.asarray(data[s]["label"]) for s in data}
        means = np.stack([x["train"][y["train"] == c].mean(0) for c in range(10)])
        pred = ((x["test"][:, None] - means[None]) ** 2).sum(-1).argmin(1)
        assert (pred == y["test"]).mean() == 1.0, task
        assert len({im.tobytes() for im in data["train"]["image"]}) == 48  # noise: no two images alike


def test_hf_taskpool_opens_every_task(built):
    from fusion.data.hf_tasks import hf_taskpool

    pool = hf_taskpool(TASKS, data_root=str(built[0] / "data"), image_size=224)
    for task in TASKS:
        assert pool.classnames(task) == tuple(SPECS[task]["classnames"])
        lengths = {s: len(pool.dataset(task, s)) for s in ("train", "val", "test")}
        assert lengths == {"train": 43, "val": 5, "test": 24}, task  # val carved from train (10%)
        x, y = pool.dataset(task, "test").batch(torch.arange(2))
        assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64


# ------------------------------------------------------------------------------------------------ open_clip
def test_open_clip_local_dir_is_tiny_vit_b32_and_reloads_bit_exactly(built):
    import open_clip

    root, info = built
    pretrained = root / "open_clip" / "pretrained"
    assert sorted(p.name for p in pretrained.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    cfg = json.loads((pretrained / "open_clip_config.json").read_text())
    real = open_clip.get_model_config("ViT-B-32")
    model_cfg = cfg["model_cfg"]
    assert model_cfg["embed_dim"] == 32 and model_cfg["quick_gelu"] is True
    assert model_cfg["vision_cfg"] == {**real["vision_cfg"], "width": 64, "layers": 2, "head_width": 32}
    assert model_cfg["text_cfg"] == {**real["text_cfg"], "width": 64, "heads": 2, "layers": 1}
    assert (model_cfg["vision_cfg"]["image_size"], model_cfg["text_cfg"]["vocab_size"]) == (224, 49408)
    assert cfg["preprocess_cfg"]["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    clip, _, preprocess = open_clip.create_model_and_transforms(info["open_clip"]["model"])
    saved = load_file(pretrained / "open_clip_model.safetensors")
    state = clip.state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    assert "224" in repr(preprocess) and clip.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"
    tokens = open_clip.get_tokenizer(info["open_clip"]["model"])(["a photo of the number: \"7\"."])
    assert tokens.shape == (1, 77) and int(tokens[0, 0]) == 49406  # the real BPE tokenizer's start token


def test_open_clip_experts_are_theta0_plus_the_seeded_perturbation(built):
    from fusion.pools.clip_pool import load_expert

    root, info = built
    theta0 = {k[len("visual."):]: v for k, v in load_file(root / "open_clip/pretrained/open_clip_model.safetensors")
              .items() if k.startswith("visual.")}
    files = info["open_clip"]["experts"]
    assert files == {"mnist": "mnist.safetensors", "eurosat": "eurosat.safetensors", "svhn": "svhn.safetensors",
                     "dtd": "dtd.pt"}
    for i, task in enumerate(TASKS):
        gen = torch.Generator().manual_seed(zlib.crc32(f"fusion-fixtures:0:{task}".encode()))
        scale = 0.01 * (1 + 0.5 * i)
        delta = {k: scale * torch.randn(theta0[k].shape, generator=gen) for k in sorted(theta0)}
        expert = load_expert(str(root / "open_clip/experts" / files[task]), cache_dir=root / "cache")
        assert set(expert) == set(theta0), task
        assert all(torch.equal(expert[k], theta0[k] + delta[k]) for k in theta0), task
        torch.testing.assert_close(expert["conv1.weight"] - theta0["conv1.weight"], delta["conv1.weight"])
        assert info["expert_scales"][task] == pytest.approx(scale)


def test_open_clip_expert_layouts(built):
    root = built[0] / "open_clip" / "experts"
    whole, visual = load_file(root / "mnist.safetensors"), load_file(root / "eurosat.safetensors")
    text = {k for k in whole if not k.startswith("visual.")}
    assert {"token_embedding.weight", "text_projection", "logit_scale", "ln_final.weight"} <= text
    assert "visual.class_embedding" in whole and "class_embedding" in visual and len(visual) == len(whole) - len(text)
    pt = torch.load(root / "dtd.pt", map_location="cpu", weights_only=True)
    assert list(pt) == ["state_dict"] and all(k.startswith("model.visual.") for k in pt["state_dict"])
    assert len(pt["state_dict"]) == len(visual)


# ------------------------------------------------------------------------------------------------------- HF
def test_hf_experts_are_the_open_clip_experts_without_projection(built):
    from fusion.pools.clip_pool import load_expert

    root, info = built
    theta0 = load_expert(info["hf"]["pretrained"], cache_dir=root / "cache")
    reference = {k[len("visual."):]: v for k, v in load_file(root / "open_clip/pretrained/open_clip_model.safetensors")
                 .items() if k.startswith("visual.")}
    assert set(theta0) == set(reference) and all(torch.equal(theta0[k], reference[k]) for k in reference)
    for task in TASKS:
        directory = Path(info["hf"]["experts"][task])
        assert json.loads((directory / "config.json").read_text())["architectures"] == ["CLIPVisionModel"]
        with safe_open(directory / "model.safetensors", "pt") as f:  # the hub experts' key layout
            assert all(k.startswith("vision_model.") for k in f.keys())
        hf = load_expert(str(directory), cache_dir=root / "cache")
        oc = load_expert(str(root / "open_clip/experts" / info["open_clip"]["experts"][task]), cache_dir=root)
        assert set(hf) == set(reference) - {"proj"}  # a CLIPVisionModel has no projection
        assert all(hf[k].shape == reference[k].shape and torch.equal(hf[k], oc[k]) for k in hf), task


def test_hf_pretrained_gives_open_clip_image_features(built):
    import open_clip
    import transformers

    root, info = built
    hf = transformers.CLIPModel.from_pretrained(info["hf"]["pretrained"]).eval()
    clip = open_clip.create_model(info["open_clip"]["model"]).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = clip.encode_image(x), hf.get_image_features(pixel_values=x)
    got = getattr(got, "pooler_output", got)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- pools from the configs
def _compose(info: dict, kind: str):
    from hydra import compose, initialize_config_dir

    group = {"open_clip": "clip-vit-b32_TA8", "hf": "clip-vit-b32_hf_TA8"}[kind]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"modelpool={group}", "taskpool=clip_TA8", *info["overrides"][kind]])


def test_real_configs_build_pools_from_the_overrides(built):
    from hydra.utils import instantiate

    import fusion  # noqa: F401  (registers the configs' resolvers)

    root, info = built
    pools = {}
    for kind in ("open_clip", "hf"):
        cfg = _compose(info, kind)
        assert list(cfg.modelpool.experts) == TASKS and list(cfg.taskpool.tasks) == TASKS, kind
        pools[kind] = instantiate(cfg.modelpool)
        assert pools[kind].tasks == TASKS and pools[kind].heads.num_classes("dtd") == 47
    assert Path(root / "cache" / "heads").is_dir()  # the heads went to the fixture's cache, not the user's
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f0 = {k: p.encoder.eval()(x) for k, p in pools.items()}
        experts = {k: p.expert_encoder("svhn").eval()(x) for k, p in pools.items()}
    assert f0["open_clip"].shape == (2, 32) and torch.equal(f0["open_clip"], f0["hf"])  # the same θ0
    assert all((experts[k] - f0[k]).abs().max() > 1e-3 for k in pools)
    assert not torch.allclose(experts["open_clip"], experts["hf"])  # the HF expert keeps θ0's projection


# ------------------------------------------------------------------------------------------------- building
def test_rebuild_is_byte_identical_and_another_seed_differs(built, tmp_path):
    root, info = built
    first = weight_files(root)
    other = build_fixtures(tmp_path / "out", ["mnist", "eurosat"], seed=1, n_train=10, n_test=5)
    changed = weight_files(tmp_path / "out")
    assert other["seed"] == 1 and set(changed) < set(first)
    assert all(changed[k] != first[k] for k in changed)
    build_fixtures(tmp_path / "out", TASKS, seed=0, n_train=48, n_test=24)  # replaces the previous build
    again = weight_files(tmp_path / "out")
    assert len(first) == 10 and set(again) == set(first) and all(again[k] == first[k] for k in first)
    for task in TASKS:
        for split in REAL_SPLITS[task]:
            name = f"data/{task}/{split}/data-00000-of-00001.arrow"
            assert (tmp_path / "out" / name).read_bytes() == (root / name).read_bytes()


def test_manifest_and_refusals(built, tmp_path, monkeypatch):
    import fusion.fixtures as fixtures

    root, info = built
    assert json.loads((root / "fixtures.json").read_text()) == json.loads(json.dumps(info))
    assert info["root"] == str(root) and Path(info["data_root"]).is_absolute()
    assert f"modelpool.model=local-dir:{root}/open_clip/pretrained" in info["overrides"]["open_clip"]
    assert info["commands"]["hf"].startswith(f"FUSION_CACHE={root}/cache fusion modelpool=clip-vit-b32_hf_TA8 ")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a fixtures build"):
        build_fixtures(user, ["mnist"])
    assert [p.name for p in user.iterdir()] == ["keep.txt"]
    with pytest.raises(KeyError, match="no shipped spec"):
        build_fixtures(tmp_path / "x", ["nope"])

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fixtures, "build_hf", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_fixtures(tmp_path / "half", ["mnist"], n_train=4, n_test=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no half-built OUT, no temp folder left


def test_full_size_config_is_open_clips_vit_b32_with_quick_gelu():
    import open_clip

    from fusion.fixtures import tiny_clip_config

    full, real = tiny_clip_config("vit-b-32"), open_clip.get_model_config("ViT-B-32")
    assert full == {**real, "quick_gelu": True} and full["vision_cfg"]["width"] == 768
    assert tiny_clip_config()["vision_cfg"]["width"] == 64
    with pytest.raises(ValueError, match="one of"):
        tiny_clip_config("huge")
