"""Learning rates across rounds: the local learning rate of each round of a run, which the server
sends with the round's instructions (Flower's FlowerTune LLM templates anneal it the same way,
along a cosine)."""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class LearningRateSchedule:
    """Round r of `rounds` trains at `learning_rate` annealed towards `min_learning_rate`:
    constant, linearly, or along half a cosine. Round 1 trains at `learning_rate`; the schedule
    reaches `min_learning_rate` one round after the last, so that no round trains at it (with the
    default 0, a last round would learn nothing). A pure function of the round: a resumed run
    continues it exactly."""

    kind: str
    learning_rate: float
    min_learning_rate: float
    rounds: int

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"learning rate schedule must be one of {list(SCHEDULES)}, got {self.kind!r}")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError(
                f"min_learning_rate {self.min_learning_rate} must lie in [0, learning_rate {self.learning_rate}]"
            )
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")

    def __call__(self, round_number: int) -> float:
        progress = min(max(round_number - 1, 0) / self.rounds, 1.0)
        span = self.learning_rate - self.min_learning_rate
        if self.kind == "linear":
            return self.learning_rate - span * progress
        if self.kind == "cosine":
            return self.min_learning_rate + 0.5 * span * (1 + math.cos(math.pi * progress))
        return self.learning_rate
