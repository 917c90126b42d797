"""Continual merging: OPCM (Tang et al., 2025) consumes the experts one at a time (memory constant in K).

The merge depends on the task order; the method runs ``num_orders`` seeded shuffles and records each order's
test accuracy (mean ± std in results.json); the returned model is the first order's.
"""
from __future__ import annotations

import statistics

import torch

from fusion.errors import ConfigError
from fusion.merge.opcm import opcm
from fusion.methods.base import MergeOutcome, RunContext
from fusion.methods.static import merged_encoder
from fusion.pools.pool import require_no_distractors


class OPCMMerge:
    """Orthogonal projection-based continual merging over ``num_orders`` shuffled task orders."""

    def __init__(self, name: str = "opcm", alpha: float = 0.5, num_orders: int = 3):
        if num_orders < 1:
            raise ConfigError(f"opcm num_orders must be ≥ 1, got {num_orders}")
        self.name, self.alpha, self.num_orders = name, alpha, num_orders

    def run(self, pool, taskpool, ctx: RunContext) -> MergeOutcome:
        require_no_distractors(pool, self.name, "merges the experts in task orders")
        theta0 = pool.pretrained_state()
        gen = torch.Generator().manual_seed(ctx.seed)
        orders, first = [], None
        for _ in range(self.num_orders):
            order = [pool.tasks[i] for i in torch.randperm(len(pool.tasks), generator=gen).tolist()]
            encoder = merged_encoder(pool, opcm(theta0, (pool.expert_state(t) for t in order), alpha=self.alpha))
            acc = ctx.evaluate(encoder, pool.heads, taskpool, "test")
            orders.append({"order": order, "mean_accuracy": sum(acc.values()) / len(acc)})
            first = first or encoder
        means = [o["mean_accuracy"] for o in orders]
        info = {"alpha": self.alpha, "orders": orders, "mean_over_orders": statistics.mean(means),
                "std_over_orders": statistics.stdev(means) if len(means) > 1 else 0.0}
        return MergeOutcome(first, info, f"OPCM continual merge, no data; {self.num_orders} task orders reported")
