"""Merge methods as Hydra targets: each has ``run(pool, taskpool, ctx) -> MergeOutcome``."""
