"""Every routing strategy by its configuration name, and how a worker makes one."""

from __future__ import annotations

import random

from workers.backend import Backend
from workers.classic import LeastConnections, P2CEwma, Random, RoundRobin, WeightedRoundRobin
from workers.learned import TableStrategy
from workers.prequal import Prequal
from workers.strategy import Strategy

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (RoundRobin, WeightedRoundRobin, LeastConnections, Random, P2CEwma, Prequal, TableStrategy)
}


def make_strategy(name: str, backends: list[Backend], *, decay: float, seed: int = 0,
                  class_names=("default",), guard_share: float = 0.0, exploration: float = 0.0,
                  probe_share: float = 0.0, deadline: float = float("inf")) -> Strategy:
    rng = random.Random(seed or None)
    if name == TableStrategy.name:
        return TableStrategy(backends, decay=decay, rng=rng, class_names=class_names,
                             guard_share=guard_share, exploration=exploration, probe_share=probe_share,
                             deadline=deadline)
    for b in backends:
        b.curve = None  # only ml learns load curves (a switch away from it stops the learning)
    return STRATEGIES[name](backends, decay=decay, rng=rng)
