"""The pieces of a CLIP pool build: caption contrast, zero-shot heads, expert fine-tuning, task-vector statistics.

1. *Pretraining* (:mod:`fusion.pools.mini8_pretrain`, done once and shipped): captions of concepts, contrasted with
   :func:`concept_contrastive_loss`.
2. *Zero-shot heads*: per class, the mean normalised text embedding over the task's templates; frozen.
3. *Experts*: the image encoder fine-tuned on each task's train split against its frozen head with
   cross-entropy (Lightning), as in the task-vectors recipe. Fine-tuning budgets differ per task, as real ones
   do, so task vectors differ in size.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler

from fusion.data.augment import random_affine
from fusion.data.taskpool import collate_batched
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
    ``coarse`` adds one concept per listed task whose captions name only the task's kind of image ("a handwritten
    digit."); ``coarse_of[task]`` is its id.
    """

    def __init__(self, taskpool, tokenize, coarse: Mapping[str, Sequence[str]] | None = None):
        captions: dict[str, list[str]] = {}
        for task in taskpool.tasks:
            for name in taskpool.classnames(task):
                captions[f"{task}/{name}"] = [t.format(name) for t in taskpool.templates(task)]
        unknown = sorted(set(coarse or {}) - set(taskpool.tasks))
        if unknown:
            raise KeyError(f"coarse captions name tasks {unknown} that the task pool lacks ({taskpool.tasks})")
        for task, texts in (coarse or {}).items():
            if not texts:
                raise ValueError(f"coarse captions of task '{task}' are empty")
            captions[f"{task}/*"] = list(texts)
        names = list(captions)
        self.concept_of = {t: torch.tensor([names.index(f"{t}/{n}") for n in taskpool.classnames(t)])
                           for t in taskpool.tasks}
        self.coarse_of = {t: names.index(f"{t}/*") for t in (coarse or {})}
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


def block_depth(name: str, num_blocks: int) -> int:
    """Depth of an open_clip ViT parameter: 0 for the stem (patch embedding, class and position embeddings,
    ``ln_pre``), ``i + 1`` for ``transformer.resblocks.i``, ``num_blocks + 1`` for the head (``ln_post``, ``proj``)."""
    if name.startswith("transformer.resblocks."):
        return int(name.split(".")[2]) + 1
    stem = ("conv1", "class_embedding", "positional_embedding", "ln_pre")
    return 0 if name.startswith(stem) else num_blocks + 1


def layer_decay_groups(named: list[tuple[str, nn.Parameter]], lr: float, decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise learning-rate decay (BEiT, Bao et al. 2022): depth ``d`` of ``D + 1``
    trains at ``lr · decay^(D + 1 − d)``, so the head trains at ``lr`` and the stem at ``lr · decay^(D + 1)``."""
    blocks = 1 + max((int(n.split(".")[2]) for n, _ in named if n.startswith("transformer.resblocks.")), default=-1)
    groups: dict[int, list[nn.Parameter]] = {}
    for name, param in named:
        groups.setdefault(block_depth(name, blocks), []).append(param)
    return [{"params": ps, "lr": lr * decay ** (blocks + 1 - d)} for d, ps in sorted(groups.items())]


class ExpertFinetuning(pl.LightningModule):
    """Fine-tune an image encoder against a frozen zero-shot head with cross-entropy (task-vectors recipe);
    ``layer_decay < 1`` lowers the learning rate of shallower blocks (:func:`layer_decay_groups`)."""

    def __init__(self, encoder: nn.Module, heads: ZeroShotHeads, task: str, steps: int, lr: float,
                 weight_decay: float, warmup: float, augment: bool, seed: int, layer_decay: float = 1.0):
        super().__init__()
        self.encoder, self.heads, self.task = encoder, heads, task
        self.steps, self.lr, self.weight_decay, self.warmup, self.augment = steps, lr, weight_decay, warmup, augment
        self.layer_decay = layer_decay
        self.gen = torch.Generator().manual_seed(seed)

    def training_step(self, batch: tuple[Tensor, Tensor], _: int) -> Tensor:
        x, y = batch
        if self.augment:
            x = random_affine(x, self.gen)
        loss = F.cross_entropy(self.heads(self.encoder(x), self.task), y)
        self.log("finetune/loss", loss)
        return loss

    def configure_optimizers(self):
        params = (self.encoder.parameters() if self.layer_decay == 1.0 else
                  layer_decay_groups(list(self.encoder.named_parameters()), self.lr, self.layer_decay))
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return [opt], [{"scheduler": warmup_cosine(opt, self.steps, self.warmup), "interval": "step"}]


@torch.no_grad()
def zero_shot_heads(clip: nn.Module, taskpool, tokenize, logit_scale: float | None = None) -> ZeroShotHeads:
    """The CLIP zero-shot heads of every task; ``logit_scale`` ``None`` takes the model's learned one."""
    clip.eval()
    heads = {t: class_embeddings(clip.encode_text, tokenize, taskpool.classnames(t), taskpool.templates(t))
             for t in taskpool.tasks}
    return ZeroShotHeads(heads, float(clip.logit_scale.exp()) if logit_scale is None else float(logit_scale))


def finetune_expert(encoder: nn.Module, heads: ZeroShotHeads, taskpool, task: str, *, steps: int,
                    batch_size: int, lr: float, weight_decay: float, warmup: float, augment: bool,
                    seed: int, accelerator: str = "cpu", layer_decay: float = 1.0) -> dict[str, Tensor]:
    """Fine-tune a copy of ``encoder`` on ``task``; returns its state dict (float32, detached)."""
    expert = copy.deepcopy(encoder).train()
    for p in expert.parameters():
        p.requires_grad_(True)
    module = ExpertFinetuning(expert, heads, task, steps, lr, weight_decay, warmup, augment, seed, layer_decay)
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
