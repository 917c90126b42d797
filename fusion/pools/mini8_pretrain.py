"""Pretrain mini8's CLIP once, as a released model is pretrained: long, on a corpus wider than its captions.

The corpus is every train image of the eight tasks. Two losses train the whole CLIP together (SLIP, Mu et al.,
ECCV 2022: image–text contrast plus image–image self-supervision on the same image tower):

- *captions*: a seeded, task-dependent fraction of the images carries a caption of its class ("a photo of the
  digit 3."); image → caption and caption → image contrast with every caption of a concept a positive (UniCL);
- *views*: every image contributes two augmented views to a SimCLR NT-Xent loss (Chen et al., 2020) through a
  small projection MLP that is discarded afterwards.

Uneven caption coverage keeps zero-shot weak where CLIP's is weak (few digit and texture captions) while the
self-supervised loss gives every task general image features: fine-tuning from such a base moves the weights
little, as fine-tuning CLIP does. The loop is a plain, resumable torch loop: it runs for hours on a CPU (or
minutes on a GPU) and writes an atomic checkpoint every ``checkpoint_every`` steps.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion.data.augment import random_affine
from fusion.pools.mini8_build import ConceptCaptions, concept_contrastive_loss, warmup_cosine, zero_shot_heads

log = logging.getLogger(__name__)


@dataclass
class PretrainCorpus:
    """All train images of a task pool: ``images`` uint8 ``[N, C, H, W]``, ``concept`` ``[N]`` (the global
    concept id of the image's caption, ``-1`` for an uncaptioned image) and ``task`` ``[N]`` (task index)."""

    images: Tensor
    concept: Tensor
    task: Tensor

    def __len__(self) -> int:
        return len(self.images)


def pretrain_corpus(taskpool, caption_fractions: Mapping[str, float], captions: ConceptCaptions, seed: int,
                    coarse_fractions: Mapping[str, float] | None = None) -> PretrainCorpus:
    """Every train image of ``taskpool``. Per task, a seeded ``caption_fractions[task]`` share is captioned with its
    class's captions and a further ``coarse_fractions[task]`` share with the task's coarse captions (tasks that
    ``captions`` has coarse captions for); the rest is uncaptioned."""
    coarse_fractions = dict(coarse_fractions or {})
    unknown = sorted(set(caption_fractions) ^ set(taskpool.tasks))
    if unknown:
        raise KeyError(f"caption_fractions must name exactly the pool's tasks {taskpool.tasks}; mismatch: {unknown}")
    missing = sorted(set(coarse_fractions) - set(captions.coarse_of))
    if missing:
        raise KeyError(f"coarse_fractions name tasks {missing} without coarse captions (recipe key coarse_captions)")
    gen = torch.Generator().manual_seed(seed)
    images, concepts, tasks = [], [], []
    for i, task in enumerate(taskpool.tasks):
        ds = taskpool.dataset(task, "train")
        n = len(ds)
        n_fine = int(round(caption_fractions[task] * n))
        n_coarse = int(round(coarse_fractions.get(task, 0.0) * n))
        if n_fine + n_coarse > n:
            raise ValueError(f"task '{task}': caption and coarse fractions add up to more than 1")
        order = torch.randperm(n, generator=gen)
        concept = torch.full((n,), -1, dtype=torch.long)
        fine = order[:n_fine]
        concept[fine] = captions.concept_of[task][ds.labels[fine]]
        if n_coarse:
            concept[order[n_fine:n_fine + n_coarse]] = captions.coarse_of[task]
        images.append(torch.as_tensor(ds.images[:]))
        concepts.append(concept)
        tasks.append(torch.full((n,), i))
    return PretrainCorpus(torch.cat(images), torch.cat(concepts), torch.cat(tasks))


def simclr_loss(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent of two views ``[B, D]``: each view's positive is the other view of its image, the other ``2B − 2``
    views are negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    sim = z @ z.T / temperature
    b = z1.shape[0]
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)


def augment_view(x: Tensor, generator: torch.Generator) -> Tensor:
    """A SimCLR view of normalised grey images ``[B, C, H, W]``: a stronger random affine, then a random contrast,
    brightness and pixel noise per image."""
    b = x.shape[0]
    x = random_affine(x, generator, degrees=15.0, scale=(0.8, 1.2), shift=0.12)
    contrast = (torch.rand(b, 1, 1, 1, generator=generator) * 0.8 + 0.6).to(x)
    bright = ((torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.6).to(x)
    noise = torch.randn(x.shape, generator=generator).to(x) * 0.1
    return x * contrast + bright + noise


class ProjectionMLP(nn.Sequential):
    """SimCLR's projection head: ``Linear → ReLU → Linear`` on the image embedding (discarded after pretraining)."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, out))


class SlipPretraining:
    """The resumable pretraining loop: ``run()`` trains ``clip`` in place from the last checkpoint to ``steps``.

    Args:
        clip: an open_clip ``CLIP`` (trained whole: image tower, text tower, logit scale).
        captions: the tokenised concept captions (:class:`fusion.pools.mini8_build.ConceptCaptions`).
        corpus: the images and their caption assignment (:func:`pretrain_corpus`).
        steps, batch_size, lr, weight_decay, warmup: AdamW with warm-up + cosine; decay on matrices only.
        stop_at: stop (and release) at this step of the ``steps``-long schedule (default: ``steps``).
        ssl_weight: the weight of the image–image loss (0 = captions only).
        ssl_temperature: NT-Xent temperature.
        seed: seeds the batches, views and caption draws.
        device: where to train; ``bf16`` autocast when ``amp``.
        checkpoint: the checkpoint file (written every ``checkpoint_every`` steps; resumed from when present).
    """

    def __init__(self, clip: nn.Module, captions: ConceptCaptions, corpus: PretrainCorpus, *, steps: int,
                 batch_size: int, lr: float, weight_decay: float, warmup: float, ssl_weight: float,
                 ssl_temperature: float, seed: int, device: str = "cpu", amp: bool = True,
                 checkpoint: Path | None = None, checkpoint_every: int = 200, log_every: int = 50,
                 stop_at: int | None = None):
        self.device = torch.device(device)
        self.clip, self.captions, self.corpus = clip.to(self.device).train(), captions, corpus
        dim = int(clip.visual.output_dim)
        with torch.random.fork_rng(devices=[]):  # the projection head's initialisation depends on the seed alone
            torch.manual_seed(seed)
            self.mlp = ProjectionMLP(dim, 4 * dim, dim).to(self.device)
        self.steps, self.batch_size, self.warmup = steps, batch_size, warmup
        self.stop_at = steps if stop_at is None else stop_at
        if not 0 < self.stop_at <= steps:
            raise ValueError(f"stop_at={stop_at} must lie in 1..steps={steps}")
        self.ssl_weight, self.ssl_temperature, self.amp = ssl_weight, ssl_temperature, amp
        params = [(n, p) for n, p in list(clip.named_parameters()) + list(self.mlp.named_parameters())]
        self.opt = torch.optim.AdamW([{"params": [p for n, p in params if p.dim() >= 2], "weight_decay": weight_decay},
                                      {"params": [p for n, p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr)
        self.sched = warmup_cosine(self.opt, steps, warmup)
        self.gen = torch.Generator().manual_seed(seed)
        self.step, self.checkpoint, self.checkpoint_every, self.log_every = 0, checkpoint, checkpoint_every, log_every
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0  # training time over every resumed run
        if checkpoint is not None and Path(checkpoint).is_file():
            self.load(checkpoint)

    def state(self) -> dict:
        return {"clip": self.clip.state_dict(), "mlp": self.mlp.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "gen": self.gen.get_state(), "step": self.step,
                "history": self.history, "seconds": self.seconds}

    def save(self, path: Path) -> None:
        """Write the whole training state atomically (a torch file of tensors and plain containers)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)  # tensors and containers only
        self.clip.load_state_dict(state["clip"])
        self.mlp.load_state_dict(state["mlp"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.gen.set_state(state["gen"].cpu())
        self.step, self.history = int(state["step"]), list(state["history"])
        self.seconds = float(state["seconds"])
        log.info("resumed pretraining from %s at step %d", path, self.step)

    def batch(self) -> tuple[Tensor, Tensor, Tensor]:
        """Two augmented views ``[B, 3, H, W]`` of a batch drawn with replacement, and its concepts ``[B]``."""
        idx = torch.randint(len(self.corpus), (self.batch_size,), generator=self.gen)
        x = self.corpus.images[idx].float().div(255).sub(0.5).div(0.5)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return augment_view(x, self.gen), augment_view(x, self.gen), self.corpus.concept[idx]

    def loss(self, v1: Tensor, v2: Tensor, concept: Tensor) -> tuple[Tensor, dict[str, float]]:
        b = v1.shape[0]
        z = self.clip.encode_image(torch.cat([v1, v2]).to(self.device))
        ssl = simclr_loss(*self.mlp(z).float().split(b), self.ssl_temperature)
        concept = torch.cat([concept, concept]).to(self.device)
        keep = concept >= 0
        text = F.normalize(self.clip.encode_text(self.captions.sample(self.gen).to(self.device)).float(), dim=-1)
        image = F.normalize(z[keep].float(), dim=-1)
        scale = self.clip.logit_scale.exp().clamp(max=100)
        cap = concept_contrastive_loss(scale * image @ text.T, concept[keep], symmetric=True) if keep.any() \
            else z.sum() * 0.0
        return cap + self.ssl_weight * ssl, {"caption": float(cap.detach()), "ssl": float(ssl.detach())}

    def run(self) -> nn.Module:
        start, done_at_start, self.seconds_before = time.time(), self.step, self.seconds
        while self.step < self.stop_at:
            v1, v2, concept = self.batch()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss, parts = self.loss(v1, v2, concept)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            self.step += 1
            self.seconds = self.seconds_before + time.time() - start
            if self.step % self.log_every == 0 or self.step == self.stop_at:
                rate = (time.time() - start) / max(1, self.step - done_at_start)
                self.history.append({"step": self.step, **parts})
                log.info("pretrain step %d/%d caption %.3f ssl %.3f (%.2f s/step, ETA %.0f min)", self.step,
                         self.steps, parts["caption"], parts["ssl"], rate, rate * (self.stop_at - self.step) / 60)
            if self.checkpoint is not None and (self.step % self.checkpoint_every == 0 or self.step == self.stop_at):
                self.save(self.checkpoint)
        return self.clip.eval()


def pretrain_base(recipe: Mapping, out_dir: str | Path, *, work_dir: str | Path, device: str = "cpu",
                  taskpool=None, data_version: str | None = None) -> dict:
    """Pretrain a CLIP from ``recipe`` (resuming ``work_dir/ckpt.pt``) and release it into ``out_dir``.

    ``recipe``: ``model`` (a registered open_clip config), ``seed``, ``steps``, ``batch_size``, ``lr``,
    ``weight_decay``, ``warmup``, ``ssl_weight``, ``ssl_temperature``, ``caption_fractions``, ``amp``; optional
    ``coarse_fractions`` / ``coarse_captions`` (images captioned by their task's coarse category only) and
    ``stop_at`` (release at this step of the ``steps``-long schedule: the shipped base stops halfway, where its
    zero-shot accuracy is still CLIP-like weak on digits, scripts and textures).
    ``taskpool``: the corpus (default: mini8, whose data version the card records). Returns the release's card
    (:func:`fusion.pools.mini8_base.write_release`).
    """
    import open_clip

    from fusion.evaluate import evaluate, summarize
    from fusion.pools.mini8_base import RELEASE_NAME, write_release
    from fusion.pools.openclip import create_clip, model_config

    if taskpool is None:
        from fusion.data.mini8 import default_root, read_manifest
        from fusion.data.taskpool import mini8_taskpool

        taskpool, data_version = mini8_taskpool(), read_manifest(default_root())["version"]
    torch.manual_seed(int(recipe["seed"]))
    clip = create_clip(recipe["model"])
    tokenize = open_clip.get_tokenizer(recipe["model"])
    captions = ConceptCaptions(taskpool, tokenize, recipe.get("coarse_captions"))
    corpus = pretrain_corpus(taskpool, recipe["caption_fractions"], captions, int(recipe["seed"]),
                             recipe.get("coarse_fractions"))
    loop = SlipPretraining(clip, captions, corpus, steps=int(recipe["steps"]), batch_size=int(recipe["batch_size"]),
                           lr=float(recipe["lr"]), weight_decay=float(recipe["weight_decay"]),
                           warmup=float(recipe["warmup"]), ssl_weight=float(recipe["ssl_weight"]),
                           ssl_temperature=float(recipe["ssl_temperature"]), seed=int(recipe["seed"]), device=device,
                           amp=bool(recipe["amp"]), checkpoint=Path(work_dir) / "ckpt.pt",
                           stop_at=recipe.get("stop_at"))
    clip = loop.run().cpu()
    released = bfloat16_roundtrip(clip)  # the zero-shot table is measured on what ships
    heads = zero_shot_heads(released, taskpool, tokenize)
    zero_shot = {s: summarize(evaluate(released.visual, heads, taskpool, split=s)) for s in ("val", "test")}
    card = {"name": RELEASE_NAME, "recipe": dict(recipe), "data_version": data_version,
            "corpus": {"images": len(corpus), "captioned": int((corpus.concept >= 0).sum())},
            "model_summary": _summary(model_config(recipe["model"]), clip), "device": str(device),
            "train_seconds": round(loop.seconds, 1), "torch": torch.__version__, "zero_shot": zero_shot,
            "loss_history": loop.history}
    return write_release(clip, out_dir, model_config(recipe["model"]), card)


def bfloat16_roundtrip(module: nn.Module) -> nn.Module:
    """A float32 copy of ``module`` whose floating weights went through bfloat16 (what a bf16 release loads as)."""
    clone = copy.deepcopy(module)
    with torch.no_grad():
        for t in list(clone.parameters()) + list(clone.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(torch.bfloat16).float())
    return clone.eval()


def _summary(cfg: Mapping, clip: nn.Module) -> str:
    v = cfg["vision_cfg"]
    n_visual = sum(p.numel() for p in clip.visual.parameters())
    return (f"ViT width {v['width']}, {v['layers']} blocks, patch {v['patch_size']} at {v['image_size']} px "
            f"({n_visual / 1e6:.2f}M image-tower parameters), text tower width {cfg['text_cfg']['width']}, "
            f"{cfg['text_cfg']['layers']} blocks, embedding dim {cfg['embed_dim']}")


def rebuild_release(out_dir: str | Path | None = None, recipe_file: str | Path | None = None,
                    device: str = "auto") -> str:
    """``fusion-build-mini8 --pretrain``: pretrain from a recipe (default: the shipped card's), release into
    ``out_dir`` (default ``<cache>/mini8-clip/<recipe hash>``, resumable there) and say how its hash compares."""
    from fusion.data.cache import default_cache_dir
    from fusion.errors import MissingFileError
    from fusion.pools.mini8_base import CARD, RELEASE_DIR, read_card
    from fusion.utils import configure_threads, read_json, resolve_device, sha256_json

    configure_threads()
    shipped = read_card() if (RELEASE_DIR / CARD).is_file() else None
    if recipe_file is None and shipped is None:
        raise MissingFileError(f"no shipped release at {RELEASE_DIR} to take the recipe from: pass --recipe FILE")
    recipe = read_json(recipe_file) if recipe_file else shipped["recipe"]
    key = sha256_json(recipe)[:12]
    out = Path(out_dir) if out_dir else default_cache_dir() / "mini8-clip" / key
    card = pretrain_base(recipe, out, work_dir=out / "work", device=str(resolve_device(device, "--device")))
    said = (f"mini8 CLIP released into {out} ({card['train_seconds'] / 60:.0f} min on {card['device']}): sha256 "
            f"{card['sha256']}, zero-shot {100 * card['zero_shot']['test']['mean_accuracy']:.1f}% on test")
    if shipped is None:
        return said + "; no shipped release to compare with"
    same = "the same as" if card["sha256"] == shipped["sha256"] else "different from"
    return (f"{said}; its weights are {same} the shipped release's ({shipped['sha256']}, zero-shot "
            f"{100 * shipped['zero_shot']['test']['mean_accuracy']:.1f}%)")
