"""Build the mini8 model pool the way CLIP pools are built, in minutes on a CPU.

1. *Pretraining*: a tiny open_clip CLIP (``fusion-mini8-vit``) trained contrastively (image → caption, every
   caption of a concept positive, UniCL-style) on uneven fractions of each task's train split, kept short so
   zero-shot accuracy stays well below the experts.
2. *Zero-shot heads*: per class, the mean normalised text embedding over the task's templates; frozen.
3. *Experts*: the image encoder fine-tuned on each task's train split against its frozen head with
   cross-entropy (Lightning), as in the task-vectors recipe. Fine-tuning budgets differ per task, as real ones
   do, so task vectors differ in size (see ../shared/MINI8-NOTES.md).
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler

from fusion.data.augment import random_affine
from fusion.data.taskpool import ImageTensorDataset, collate_batched
from fusion.pools.heads import ZeroShotHeads, class_embeddings

log = logging.getLogger(__name__)


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup·steps`` then cosine decay to 0."""
    n_warm = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - n_warm) / max(1, steps - n_warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def random_batches(dataset, batch_size: int, steps: int, seed: int) -> DataLoader:
    """``steps`` batches drawn with replacement (seeded), for step-budgeted training."""
    gen = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, replacement=True, num_samples=steps * batch_size, generator=gen)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_batched)


def quiet_trainer(steps: int, seed: int, accelerator: str = "cpu") -> pl.Trainer:
    """A Trainer for the pool build: fixed steps, one device, no checkpoints, loggers or progress bars."""
    pl.seed_everything(seed, workers=True, verbose=False)
    return pl.Trainer(max_steps=steps, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


class ConceptCaptions:
    """Tokenised captions of every concept: ``tokens[concept, caption]``.

    A concept is a (task, class) pair and its captions are the task's templates filled with the class name
    (every caption of a concept is a positive, UniCL-style). ``concept_of[task]`` maps labels to concept ids.
    """

    def __init__(self, taskpool, tokenize):
        captions: dict[str, list[str]] = {}
        for task in taskpool.tasks:
            for name in taskpool.classnames(task):
                captions[f"{task}/{name}"] = [t.format(name) for t in taskpool.templates(task)]
        names = list(captions)
        self.concept_of = {t: torch.tensor([names.index(f"{t}/{n}") for n in taskpool.classnames(t)])
                           for t in taskpool.tasks}
        width = max(len(c) for c in captions.values())
        self.tokens = torch.stack([tokenize([c[i % len(c)] for i in range(width)]) for c in captions.values()])

    def sample(self, generator: torch.Generator) -> Tensor:
        """One random caption per concept: ``[concepts, context]``."""
        pick = torch.randint(self.tokens.shape[1], (self.tokens.shape[0],), generator=generator)
        return self.tokens[torch.arange(self.tokens.shape[0]), pick]


def concept_contrastive_loss(logits: Tensor, concept: Tensor, symmetric: bool = False) -> Tensor:
    """Contrastive loss of images against concept captions; ``logits [B, concepts]``, ``concept [B]``.

    Image → caption: cross-entropy over every concept's caption. With ``symmetric``, averaged with caption → image
    (UniCL): for each concept present in the batch, ``−log Σ_{i ∈ concept} softmax_i(logits[:, concept])`` over the
    batch's images (every image of the concept is a positive), averaged over the present concepts.
    """
    loss = F.cross_entropy(logits, concept)
    if not symmetric:
        return loss
    present = torch.unique(concept)
    positives = concept[None, :] == present[:, None]  # [P, B]
    logp = F.log_softmax(logits.T[present], dim=-1)
    return 0.5 * (loss - (torch.logsumexp(logp.masked_fill(~positives, float("-inf")), -1)).mean())


class ContrastivePretraining(pl.LightningModule):
    """Image → concept-caption contrastive pretraining of a whole CLIP (learnable logit scale)."""

    def __init__(self, clip: nn.Module, captions: ConceptCaptions, steps: int, lr: float, weight_decay: float,
                 warmup: float, augment: bool, seed: int, symmetric: bool = False):
        super().__init__()
        self.clip, self.captions, self.symmetric = clip, captions, symmetric
        self.steps, self.lr, self.weight_decay, self.warmup, self.augment = steps, lr, weight_decay, warmup, augment
        self.gen = torch.Generator().manual_seed(seed)

    def training_step(self, batch: tuple[Tensor, Tensor], _: int) -> Tensor:
        x, concept = batch
        if self.augment:
            x = random_affine(x, self.gen)
        image = F.normalize(self.clip.encode_image(x), dim=-1)
        text = F.normalize(self.clip.encode_text(self.captions.sample(self.gen).to(x.device)), dim=-1)
        scale = self.clip.logit_scale.exp().clamp(max=100)
        loss = concept_contrastive_loss(scale * image @ text.T, concept, self.symmetric)
        self.log("pretrain/loss", loss)
        if self.global_step % 50 == 0:
            log.info("pretrain step %d/%d loss %.3f", self.global_step, self.steps, float(loss.detach()))
        return loss

    def configure_optimizers(self):
        decay = [p for n, p in self.clip.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.clip.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr)
        return [opt], [{"scheduler": warmup_cosine(opt, self.steps, self.warmup), "interval": "step"}]


class ExpertFinetuning(pl.LightningModule):
    """Fine-tune an image encoder against a frozen zero-shot head with cross-entropy (task-vectors recipe)."""

    def __init__(self, encoder: nn.Module, heads: ZeroShotHeads, task: str, steps: int, lr: float,
                 weight_decay: float, warmup: float, augment: bool, seed: int):
        super().__init__()
        self.encoder, self.heads, self.task = encoder, heads, task
        self.steps, self.lr, self.weight_decay, self.warmup, self.augment = steps, lr, weight_decay, warmup, augment
        self.gen = torch.Generator().manual_seed(seed)

    def training_step(self, batch: tuple[Tensor, Tensor], _: int) -> Tensor:
        x, y = batch
        if self.augment:
            x = random_affine(x, self.gen)
        loss = F.cross_entropy(self.heads(self.encoder(x), self.task), y)
        self.log("finetune/loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.encoder.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return [opt], [{"scheduler": warmup_cosine(opt, self.steps, self.warmup), "interval": "step"}]


def pretraining_set(taskpool, fractions: Mapping[str, float], concept_of: Mapping[str, Tensor], seed: int):
    """Uneven, seeded fractions of each task's train split, labelled by global concept id."""
    gen = torch.Generator().manual_seed(seed)
    images, concepts = [], []
    for task in taskpool.tasks:
        ds = taskpool.dataset(task, "train")
        n = max(1, int(round(fractions[task] * len(ds))))
        idx = torch.randperm(len(ds), generator=gen)[:n]
        images.append(ds.images[idx])
        concepts.append(concept_of[task][ds.labels[idx]])
    return ImageTensorDataset(torch.cat(images), torch.cat(concepts), name="mini8/pretrain")


def pretrain_clip(clip: nn.Module, taskpool, tokenize, *, fractions: Mapping[str, float], steps: int,
                  batch_size: int, lr: float, weight_decay: float, warmup: float, augment: bool,
                  seed: int, accelerator: str = "cpu", symmetric: bool = False) -> nn.Module:
    """Contrastively pretrain ``clip`` in place on the concept captions of ``taskpool``; returns it."""
    unknown = sorted(set(fractions) ^ set(taskpool.tasks))
    if unknown:
        raise KeyError(f"pretrain.fractions must name exactly the pool's tasks {taskpool.tasks}; mismatch: {unknown}")
    captions = ConceptCaptions(taskpool, tokenize)
    data = pretraining_set(taskpool, fractions, captions.concept_of, seed)
    log.info("pretraining on %d images, %d concepts, %d steps", len(data), captions.tokens.shape[0], steps)
    module = ContrastivePretraining(clip, captions, steps, lr, weight_decay, warmup, augment, seed, symmetric)
    quiet_trainer(steps, seed, accelerator).fit(module, random_batches(data, batch_size, steps, seed))
    return clip.cpu().eval()


@torch.no_grad()
def zero_shot_heads(clip: nn.Module, taskpool, tokenize, max_logit_scale: float) -> ZeroShotHeads:
    """The CLIP zero-shot heads of every task, with the learned logit scale (capped)."""
    clip.eval()
    heads = {t: class_embeddings(clip.encode_text, tokenize, taskpool.classnames(t), taskpool.templates(t))
             for t in taskpool.tasks}
    return ZeroShotHeads(heads, min(float(clip.logit_scale.exp()), max_logit_scale))


def finetune_expert(encoder: nn.Module, heads: ZeroShotHeads, taskpool, task: str, *, steps: int,
                    batch_size: int, lr: float, weight_decay: float, warmup: float, augment: bool,
                    seed: int, accelerator: str = "cpu") -> dict[str, Tensor]:
    """Fine-tune a copy of ``encoder`` on ``task``; returns its state dict (float32, detached)."""
    expert = copy.deepcopy(encoder).train()
    for p in expert.parameters():
        p.requires_grad_(True)
    module = ExpertFinetuning(expert, heads, task, steps, lr, weight_decay, warmup, augment, seed)
    quiet_trainer(steps, seed, accelerator).fit(module, random_batches(taskpool.dataset(task, "train"), batch_size,
                                                                       steps, seed))
    return {k: v.detach().cpu().clone() for k, v in expert.state_dict().items()}


def task_vector_stats(pretrained: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Any]:
    """Relative norms ``‖τ_k‖/‖θ0‖`` and pairwise cosines of the flattened task vectors."""
    keys = [k for k, v in pretrained.items() if v.is_floating_point()]
    theta0 = torch.cat([pretrained[k].flatten().double() for k in keys])
    tvs = {t: torch.cat([(e[k].double() - pretrained[k].double()).flatten() for k in keys]) for t, e in experts.items()}
    tasks = list(tvs)
    flat = F.normalize(torch.stack([tvs[t] for t in tasks]), dim=1)
    cos = flat @ flat.T
    off = cos[~torch.eye(len(tasks), dtype=torch.bool)]
    return {"relative_norm": {t: float(tvs[t].norm() / theta0.norm()) for t in tasks},
            "cosine": {a: {b: round(float(cos[i, j]), 4) for j, b in enumerate(tasks)} for i, a in enumerate(tasks)},
            "mean_pairwise_cosine": float(off.mean()) if len(off) else float("nan")}
