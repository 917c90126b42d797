"""The one training loop (a LightningModule), its objectives and the multi-task DataModule."""
