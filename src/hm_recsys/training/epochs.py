"""What one training epoch reports: ``training.fit`` writes an ``EpochLog``, ``hm_recsys.tracking`` logs it.

A leaf module (no project imports), so the two meet here and neither imports
the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EpochLog:
    """One epoch: mean training loss, validation metrics, wall seconds, examples seen, per-step losses."""

    epoch: int
    train_loss: float
    valid: dict[str, float]
    seconds: float
    examples: int
    step_losses: list[float] = field(repr=False, default_factory=list)
    first_step: int = 0  # global step of step_losses[0]

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else float("nan")
