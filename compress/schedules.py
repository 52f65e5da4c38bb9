"""Learning-rate multipliers shared by every training loop (distill's recipes, compress's short recovery).

Torch-free: a function of the step for ``torch.optim.lr_scheduler.LambdaLR``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("cosine", "constant")


def warmup_cosine(
    total_steps: int, warmup_steps: int = 0, floor: float = 0.0, decay: str = "cosine"
) -> Callable[[int], float]:
    """LR multiplier for ``torch.optim.lr_scheduler.LambdaLR``.

    Linear warm-up ``(step + 1) / warmup_steps`` over the first ``warmup_steps`` steps, then either a half
    cosine from 1 down to ``floor`` at ``total_steps`` (``decay="cosine"``, held at ``floor`` after) or 1
    (``decay="constant"``). The returned function is a closure, not a picklable object, so a scheduler's
    state_dict does not store it: a resumed run builds it anew from its own (possibly larger) total.
    """
    if decay not in SCHEDULES:
        raise ValueError(f"decay must be one of {SCHEDULES}, got {decay!r}")
    if total_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps} and {warmup_steps}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
