"""The real CLIP path, offline and tiny: open_clip pools, expert formats, HF conversion, heads cache, HF task pools."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fusion.merge.task_vectors import PoolMismatchError
from fusion.pools.clip_pool import (CLIPModelPool, clip_pool, create_open_clip, load_expert, visual_state_dict,
                                    zero_shot_heads)

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 16, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _register(tmp: Path, name: str, cfg: dict) -> str:
    import open_clip

    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A tiny open_clip CLIP config matching the tiny HF CLIPVisionConfig below (QuickGELU, width 64, 2 layers)."""
    return _register(tmp_path_factory.mktemp("cfg"), "fusion-test-tiny", TINY)


class StubTaskPool:
    """Only what the heads need: class names and templates."""

    def __init__(self, classnames: dict[str, list[str]], templates=("a photo of a {}.", "a {}.")):
        self.tasks, self._names, self._templates = list(classnames), classnames, tuple(templates)

    def classnames(self, task):
        return self._names[task]

    def templates(self, task):
        return self._templates


TASKS = StubTaskPool({"mnist": [str(i) for i in range(10)], "eurosat": ["forest", "river", "lake"]})


def _perturbed(state: dict, seed: int, scale: float = 1e-2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}


# ------------------------------------------------------------------------------------------------ open_clip
def test_random_init_vit_b32_builds_offline():
    clip, preprocess = create_open_clip("ViT-B-32", None)
    state = clip.visual.state_dict()
    assert len(state) == 152 and state["conv1.weight"].shape == (768, 3, 32, 32)
    assert sum(v.numel() for v in state.values()) == pytest.approx(87.85e6, rel=1e-3)
    assert clip.visual.output_dim == 512 and "224" in repr(preprocess)


def test_pool_from_safetensors_and_pt_layouts(tiny, tmp_path):
    torch.manual_seed(0)
    clip, _ = create_open_clip(tiny, None)
    theta0 = clip.visual.state_dict()
    full = {f"visual.{k}": v for k, v in _perturbed(theta0, 1).items()} | {"logit_scale": clip.logit_scale.detach()}
    save_file(full, tmp_path / "mnist.safetensors")                          # whole-CLIP keys
    save_file(_perturbed(theta0, 2), tmp_path / "eurosat.safetensors")       # visual-only keys
    torch.save({"state_dict": {f"model.visual.{k}": v for k, v in _perturbed(theta0, 3).items()}}, tmp_path / "dtd.pt")
    tasks = StubTaskPool({"mnist": ["0", "1"], "eurosat": ["a", "b", "c"], "dtd": ["x", "y"]})
    torch.manual_seed(0)  # clip_pool builds its own random θ0: the same one
    pool = clip_pool(tiny, None, {"mnist": "mnist.safetensors", "eurosat": "eurosat.safetensors", "dtd": "dtd.pt"},
                     tasks, checkpoint_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), tv_dtype="bfloat16")
    assert isinstance(pool, CLIPModelPool) and pool.tasks == ["mnist", "eurosat", "dtd"]
    assert torch.equal(pool.pretrained_state()["conv1.weight"], theta0["conv1.weight"])
    for seed, task in ((1, "mnist"), (2, "eurosat"), (3, "dtd")):
        want = _perturbed(theta0, seed)
        assert set(pool.experts[task]) == set(want)
        assert all(torch.equal(pool.experts[task][k], want[k]) for k in want), task
    tv = pool.task_vectors()
    assert tv["conv1.weight"].dtype == torch.bfloat16 and tv["conv1.weight"].shape[0] == 3
    fp32 = pool.task_vectors(torch.float32)
    torch.testing.assert_close(fp32["proj"][1], _perturbed(theta0, 2)["proj"] - theta0["proj"])
    sub = pool.select(["dtd"])
    assert isinstance(sub, CLIPModelPool) and sub.tasks == ["dtd"] and sub.tv_dtype == torch.bfloat16
    assert pool.heads.num_classes("eurosat") == 3 and pool.manifest["tv_dtype"] == "bfloat16"


def test_expert_of_another_architecture_names_the_key(tiny, tmp_path):
    other = _register(tmp_path, "fusion-test-tiny3", {**TINY, "vision_cfg": {**TINY["vision_cfg"], "layers": 3}})
    clip3, _ = create_open_clip(other, None)
    save_file(clip3.visual.state_dict(), tmp_path / "mnist.safetensors")
    with pytest.raises(PoolMismatchError, match=r"transformer\.resblocks\.2\.") as err:
        clip_pool(tiny, None, {"mnist": str(tmp_path / "mnist.safetensors")}, TASKS, cache_dir=str(tmp_path))
    assert "mnist" in str(err.value) and "unexpected" in str(err.value)


def test_pickled_module_and_missing_download_are_refused(tiny, tmp_path):
    clip, _ = create_open_clip(tiny, None)
    torch.save(clip.visual, tmp_path / "module.pt")
    with pytest.raises(PoolMismatchError, match="convert_task_vectors_ckpt"):
        load_expert(str(tmp_path / "module.pt"), cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="download=true"):
        load_expert("https://example.invalid/ckpt/mnist.safetensors", cache_dir=tmp_path)
    with pytest.raises(PoolMismatchError, match="class_embedding"):
        visual_state_dict({"weight": torch.zeros(2)}, "x.safetensors")


# ---------------------------------------------------------------------------------------------------- heads
def test_zero_shot_heads_are_cached(tiny, tmp_path, monkeypatch):
    import open_clip

    clip, _ = create_open_clip(tiny, None)
    tokenizer = open_clip.get_tokenizer(tiny)
    first = zero_shot_heads(clip, tokenizer, TASKS, tmp_path, "tiny-key")
    assert len(list((tmp_path / "heads").glob("*.safetensors"))) == 2
    head = first.weight("mnist")
    assert head.shape == (10, 16) and not torch.allclose(head[0], head[1])

    def boom(*a, **k):
        raise AssertionError("encode_text must not run when the heads are cached")

    monkeypatch.setattr(clip, "encode_text", boom)
    second = zero_shot_heads(clip, tokenizer, TASKS, tmp_path, "tiny-key")
    assert torch.equal(first.weight("mnist"), second.weight("mnist"))
    with pytest.raises(AssertionError, match="must not run"):  # other templates or model: a new key
        zero_shot_heads(clip, tokenizer, StubTaskPool({"mnist": list("0123456789")}, ("{}",)), tmp_path, "tiny-key")
    with pytest.raises(AssertionError, match="must not run"):
        zero_shot_heads(clip, tokenizer, TASKS, tmp_path, "other-model")


# ---------------------------------------------------------------------------------------------- HF convert
def _hf_tiny():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16,
                                        hidden_act="quick_gelu")
    torch.manual_seed(0)
    return transformers, cfg


def test_hf_conversion_gives_the_same_features(tiny):
    transformers, cfg = _hf_tiny()
    from open_clip.model import _build_vision_tower

    from fusion.pools.hf_convert import hf_clip_vision_to_open_clip

    hf = transformers.CLIPVisionModelWithProjection(cfg).eval()
    state = hf.state_dict()
    converted = hf_clip_vision_to_open_clip(state, visual_projection=state["visual_projection.weight"])
    visual = _build_vision_tower(16, TINY["vision_cfg"], quick_gelu=True).eval()  # QuickGELU, as HF CLIP
    visual.load_state_dict(converted, strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want, got = hf(pixel_values=x).image_embeds, visual(x)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # same math, different kernels: fp32 round-off only
    q = state["vision_model.encoder.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(converted["transformer.resblocks.1.attn.in_proj_weight"][:64], q)


def test_hf_checkpoint_directory_loads_into_a_pool(tiny, tmp_path):
    transformers, cfg = _hf_tiny()
    hf = transformers.CLIPVisionModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf-mnist")
    torch.manual_seed(0)
    pool = clip_pool(tiny, None, {"mnist": str(tmp_path / "hf-mnist")}, TASKS, cache_dir=str(tmp_path))
    expert = pool.expert_encoder("mnist")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = hf(pixel_values=x).pooler_output @ pool.encoder.proj  # no HF projection: θ0's is kept
        torch.testing.assert_close(expert(x), want, atol=1e-5, rtol=1e-5)


def test_hf_loading_without_transformers_says_how_to_install(monkeypatch):
    from fusion.pools.hf_convert import load_hf_clip_vision

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'fusion\[transformers\]'"):
        load_hf_clip_vision("tanganke/clip-vit-base-patch32_mnist")


# ------------------------------------------------------------------------------------ task-vectors convert
def _tiny_clip_without_text(tiny):
    clip, _ = create_open_clip(tiny, None)
    delattr(clip, "transformer")  # what the task-vectors ImageEncoder does
    return clip


def _pickle_with_class(path: Path, module_name: str, class_name: str, clip: nn.Module) -> None:
    """torch.save an object of ``module_name.class_name`` (then make that module unimportable again)."""
    module = types.ModuleType(module_name)
    cls = type(class_name, (nn.Module,), {"__module__": module_name})
    setattr(module, class_name, cls)
    parents = module_name.split(".")
    for i in range(1, len(parents)):
        sys.modules.setdefault(".".join(parents[:i]), types.ModuleType(".".join(parents[:i])))
    sys.modules[module_name] = module
    try:
        obj = cls()
        obj.model = clip
        torch.save(obj, path)
    finally:
        for i in range(len(parents), 0, -1):
            sys.modules.pop(".".join(parents[:i]), None)


def test_task_vectors_conversion_needs_trust(tiny, tmp_path, capsys):
    from fusion.pools.convert_task_vectors_ckpt import main

    clip = _tiny_clip_without_text(tiny)
    src, dst = tmp_path / "finetuned.pt", tmp_path / "mnist.safetensors"
    _pickle_with_class(src, "legacy_task_vectors.modeling", "OldImageEncoder", clip)
    assert main([str(src), str(dst)]) == 2 and not dst.exists()
    err = capsys.readouterr().err
    assert "--trust" in err and "arbitrary code" in err and "sha256" in err
    assert main([str(src), str(dst), "--trust"]) == 0
    out, want = load_file(dst), clip.visual.state_dict()
    assert set(out) == set(want) and all(torch.equal(out[k], want[k]) for k in want)


def test_task_vectors_image_encoder_converts_with_the_allow_list(tiny, tmp_path):
    from fusion.pools.convert_task_vectors_ckpt import convert

    clip = _tiny_clip_without_text(tiny)
    src = tmp_path / "finetuned.pt"
    _pickle_with_class(src, "src.modeling", "ImageEncoder", clip)  # the paper's class, not importable here
    out = convert(src, tmp_path / "out.safetensors", trust=False)
    assert torch.equal(out["conv1.weight"], clip.visual.conv1.weight) and "logit_scale" not in out


# --------------------------------------------------------------------------------------------- HF task pool
def _fixture_dataset(path: Path, names: list[str], n: int = 30, columns=("image", "label"), seed: int = 0) -> Path:
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features({columns[0]: datasets.Image(), columns[1]: datasets.ClassLabel(names=names)})

    def split(m):
        return datasets.Dataset.from_dict(
            {columns[0]: [rng.integers(0, 255, (20, 24, 3), dtype=np.uint8) for _ in range(m)],
             columns[1]: [i % len(names) for i in range(m)]}, features=features)

    datasets.DatasetDict({"train": split(n), "test": split(n // 2)}).save_to_disk(str(path))
    return path


def test_hf_taskpool_reads_local_datasets(tmp_path):
    import datasets

    from fusion.data.contract import check_task_dataset, check_task_pool
    from fusion.data.hf_tasks import default_transform, hf_taskpool

    _fixture_dataset(tmp_path / "sun397", ["/a/abbey", "/a/airplane_cabin", "/b/bowling_alley"])
    _fixture_dataset(tmp_path / "mnist", [str(i) for i in range(10)], n=40)
    cache = tmp_path / "decoded"
    pool = check_task_pool(hf_taskpool(["sun397", "mnist"], data_root=str(tmp_path), image_size=32, val_fraction=0.2,
                                       seed=1, decoded_cache=str(cache)))
    assert pool.classnames("sun397") == ("abbey", "airplane cabin", "bowling alley")  # ClassLabel, cleaned
    assert pool.classnames("mnist") == tuple("0123456789")
    assert pool.templates("mnist") == ('a photo of the number: "{}".',)
    train, val, test = (check_task_dataset(pool.dataset("mnist", s)) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (32, 8, 20)
    x, y = test.batch(torch.arange(20))
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # the decoded cache gives exactly what CLIP's transform gives image by image (independent computation)
    raw = datasets.load_from_disk(str(tmp_path / "mnist"))["test"]
    transform = default_transform(32)
    assert torch.equal(x, torch.stack([transform(im) for im in raw["image"]]))
    assert torch.equal(y, torch.as_tensor(raw["label"]))
    assert x.std() > 0.1  # CLIP-normalised pixels, not a constant
    pixels = [{bytes(im.numpy().tobytes()) for im in d.images} for d in (train, val)]
    assert not pixels[0] & pixels[1] and len(pixels[0]) == 32  # val carved from train, disjoint
    assert pool.select(["mnist"]).tasks == ["mnist"]
    again = hf_taskpool(["mnist"], data_root=str(tmp_path), image_size=32, val_fraction=0.2, seed=1,
                        decoded_cache=str(cache))
    assert torch.equal(again.dataset("mnist", "val").batch(torch.tensor([3]))[0], val.batch(torch.tensor([3]))[0])
    assert len(list(cache.iterdir())) == 3  # mnist train/val/test; the reopened val read the cache, sun397 unread
    other = hf_taskpool(["mnist"], data_root=str(tmp_path), image_size=24, decoded_cache=str(cache))
    assert other.dataset("mnist", "test").batch(torch.arange(2))[0].shape == (2, 3, 24, 24)
    assert other.fingerprint() != again.fingerprint()  # another transform: another data identity


def test_decoded_cache_is_reused_and_keyed_by_transform(tmp_path, monkeypatch):
    import fusion.data.decoded as decoded
    from fusion.data.hf_tasks import hf_taskpool

    _fixture_dataset(tmp_path / "mnist", [str(i) for i in range(10)], n=20)
    kwargs = {"data_root": str(tmp_path), "image_size": 32, "decoded_cache": str(tmp_path / "dec")}
    first = hf_taskpool(["mnist"], **kwargs).dataset("mnist", "test").batch(torch.arange(10))[0]

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(decoded, "_write", boom)
    second = hf_taskpool(["mnist"], **kwargs).dataset("mnist", "test").batch(torch.arange(10))[0]
    assert torch.equal(first, second)
    with pytest.raises(AssertionError, match="decoded again"):  # another preprocessing is never read from the cache
        hf_taskpool(["mnist"], **{**kwargs, "image_size": 28}).dataset("mnist", "test")


def test_task_contract_names_the_class_and_the_missing_methods():
    from fusion.data.contract import TaskContractError, check_task_dataset, check_task_pool

    class NoBatch:
        name = "x"

        def __len__(self):
            return 1

    with pytest.raises(TaskContractError, match=r"NoBatch is not a task dataset: it lacks \['batch', 'to'\]"):
        check_task_dataset(NoBatch())
    with pytest.raises(TaskContractError, match=r"StubTaskPool is not a task pool: it lacks \['dataset', 'select', "
                                                r"'fingerprint'\]"):
        check_task_pool(TASKS, "taskpool (tests.StubTaskPool)")


def test_hf_taskpool_column_and_classname_errors(tmp_path):
    from fusion.data.hf_tasks import DatasetSpecError, hf_taskpool

    _fixture_dataset(tmp_path / "mnist", list("0123456789"), columns=("image", "target"))
    pool = hf_taskpool(["mnist"], overrides={"mnist": {"path": str(tmp_path / "mnist")}}, image_size=32)
    with pytest.raises(DatasetSpecError) as err:
        pool.dataset("mnist", "test")
    msg = str(err.value)
    for needle in ("no column 'label'", str(tmp_path / "mnist"), "['image', 'target']",
                   "overrides.mnist.label_column", "probably 'target'"):
        assert needle in msg
    _fixture_dataset(tmp_path / "fer", ["a", "b"], columns=("jpg", "cls"))  # the shipped spec has 7 classes
    pool = hf_taskpool(["fer2013"], overrides={"fer2013": {"path": str(tmp_path / "fer")}}, image_size=32)
    with pytest.raises(DatasetSpecError, match=r"7 class names given.*num_classes=2.*overrides\.fer2013\.classnames"):
        pool.dataset("fer2013", "test")
    ok = hf_taskpool(["fer2013"], overrides={"fer2013": {"path": str(tmp_path / "fer"), "classnames": ["x", "y"]}},
                     image_size=32)
    assert len(ok.dataset("fer2013", "test")) == 15 and ok.classnames("fer2013") == ("x", "y")


def test_hub_dataset_offline_fails_fast_with_instructions(tmp_path):
    code = textwrap.dedent("""
        import time, sys
        from fusion.data.hf_tasks import hf_taskpool, DatasetUnavailableError
        pool = hf_taskpool(["mnist"], image_size=32)
        start = time.time()
        try:
            pool.dataset("mnist", "test")
        except DatasetUnavailableError as e:
            print(f"{time.time() - start:.2f}")
            print(e)
            sys.exit(0)
        sys.exit(1)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seconds, message = proc.stdout.split("\n", 1)
    assert float(seconds) < 20 and time.time() - start < 40
    for needle in ("ylecun/mnist", "HF_HUB_OFFLINE", "save_to_disk", "overrides.mnist.path"):
        assert needle in message


def test_shipped_specs_are_consistent():
    from fusion.data.clip_task_specs import SPECS, TA8, TALL14, TALL20
    from fusion.data.hf_tasks import task_spec

    assert len(TA8) == 8 and len(TALL14) == 14 and len(TALL20) == 20 == len(set(TALL20)) == len(SPECS)
    sizes = {"gtsrb": 43, "resisc45": 45, "dtd": 47, "eurosat": 10, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
             "fer2013": 7, "emnist_letters": 26, "kmnist": 10, "cifar10": 10, "pcam": 2}
    for task in TALL20:
        spec = task_spec(task)
        assert 1 <= len(spec.templates) <= 18 and all(t.count("{}") == 1 for t in spec.templates), task
        if task in sizes:
            assert len(spec.classnames) == sizes[task] == len(set(spec.classnames)), task
    assert task_spec("resisc45").templates[6] == "satellite imagery of a {}."
    assert task_spec("food101").splits["test"] == "validation"


# -------------------------------------------------------------------------------------------- GPU benchmark
def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path):
    """The GPU benchmark times the library's MergeTraining under a real Trainer (smoke run on CPU)."""
    import open_clip

    from fusion.train.module import MergeTraining

    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "benchmarks" / "gpu_adamerging_vitb32.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = tmp_path / "fusion-bench-tiny.json"
    model.write_text(json.dumps(TINY))
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--model", str(model), "--image-size", "32", "--steps", "2", "--warmup", "1",
            "--num-tasks", "2", "--batch-size", "4", "--threads", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    tower = open_clip.create_model("fusion-bench-tiny", pretrained=None, force_image_size=32).visual
    floating = sum(p.is_floating_point() for p in tower.parameters())
    assert result["loop"] == "fusion.train.module.MergeTraining"
    assert result["lambda_changed"] is True
    assert result["steps"] == 2 and len(result["step_seconds"]) == 2
    assert result["num_tensors"] == floating and result["num_tasks"] == 2 and result["precision"] == "32-true"
    assert result["step_seconds_median"] > 0 and result["ratio_to_floor"] > 0
    assert result["seconds_per_1000_steps"] == pytest.approx(1000 * result["step_seconds_median"])
    module, data = bench.build(bench.parse(argv), torch.device("cpu"))
    assert type(module) is MergeTraining and isinstance(module, MergeTraining)
    assert type(data).__module__ == "fusion.train.datamodule"  # the library's stream, not a copy
    batch = bench.first_batch(data)
    assert list(batch) == module.heads.tasks and all(x.shape == (4, 3, 32, 32) and y is None
                                                     for x, y in batch.values())
