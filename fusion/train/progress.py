"""The training progress bar: steps of the named training stage, with elapsed time and ETA.

A learned merge trains for ``max_steps`` optimizer steps over an endless stream, so Lightning's epoch counter is
meaningless (its rich bar reads ``Epoch 0/-2``); this bar names the stage (``adamerging_layer_wise``,
``concrete_adamerging_layer_wise/phase1``) and counts steps to ``max_steps``.
"""
from __future__ import annotations

from pytorch_lightning.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar described by the training stage instead of the epoch."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def _get_train_description(self, current_epoch: int) -> str:
        return f"training {self.stage}"
