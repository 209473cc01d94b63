"""`train`'s two phases (head, then the whole network) and the per-epoch learning rate within each phase."""

from __future__ import annotations

import dataclasses
import math

PLATEAU_PATIENCE = 2
PLATEAU_FACTOR = 0.2
PLATEAU_MIN_DELTA = 1e-4


@dataclasses.dataclass
class Phase:
    name: str  # "head" or "full"
    start: int  # first epoch (0-based, global)
    stop: int  # one past the last epoch
    base_lr: float


def head_learning_rate(config) -> float:
    """The head phase's rate: ``head_learning_rate``, or (0) 10 x ``learning_rate``."""
    return config.head_learning_rate if config.head_learning_rate > 0 else 10.0 * config.learning_rate


def phases_of(config) -> list[Phase]:
    out = []
    if config.head_epochs > 0:
        out.append(Phase("head", 0, config.head_epochs, head_learning_rate(config)))
    if config.epochs > config.head_epochs:
        out.append(Phase("full", config.head_epochs, config.epochs, config.learning_rate))
    return out


def cosine_lr(phase: Phase, epoch: int) -> float:
    """Cosine decay per epoch within the phase; the last epoch still gets a small non-zero rate."""
    length = max(1, phase.stop - phase.start)
    return phase.base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - phase.start) / length))


def plateau_lr(phase: Phase, schedule_state: dict) -> float:
    """The ``plateau`` rate of the coming epoch; ``schedule_state`` (checkpointed) restarts with each phase."""
    if schedule_state.get("phase") != phase.name:  # a new phase starts from its own base rate
        schedule_state.clear()
        schedule_state.update(phase=phase.name, lr=phase.base_lr)
    return schedule_state["lr"]


def plateau_update(phase: Phase, schedule_state: dict, monitored: float) -> None:
    """After an epoch: x``PLATEAU_FACTOR`` once ``PLATEAU_PATIENCE`` epochs brought no better ``monitored``."""
    best = schedule_state.get("best")
    if best is None or monitored < best - PLATEAU_MIN_DELTA:
        schedule_state.update(best=monitored, wait=0)
        return
    schedule_state["wait"] = schedule_state.get("wait", 0) + 1
    if schedule_state["wait"] >= PLATEAU_PATIENCE:
        schedule_state["lr"] = max(schedule_state["lr"] * PLATEAU_FACTOR, phase.base_lr * 1e-3)
        schedule_state["wait"] = 0
