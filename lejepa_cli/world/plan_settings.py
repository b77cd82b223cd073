"""What a planning run is asked for: the CEM planner's settings and the goals' default distance.

Torch-free, so the commands can take their option defaults from here at import (`lejepa --help`
stays fast) and every default is written once: `lejepa world plan | stress`, `plan()`, `stress()`
and the world recipes of `lejepa reproduce` all read CEMConfig's.

    from lejepa_cli.world.plan_settings import CEMConfig
    cfg = CEMConfig(candidates=100, iterations=10, elites=10, horizon=20, cost="min")
    cfg.check()
"""

from __future__ import annotations

from dataclasses import dataclass

from lejepa_cli.errors import UserError

COSTS = ("final", "min")
GOAL_OFFSET = 25  # goals: the exploration policy's state this many steps after the start (LeWM's evaluation)


@dataclass(frozen=True)
class CEMConfig:
    """LeWM's defaults: 300 candidates, 30 iterations, keep the best 30, horizon 5 blocks."""

    candidates: int = 300
    iterations: int = 30
    elites: int = 30
    horizon: int = 5
    init_std: float = 1.0
    min_std: float = 0.05  # keeps some exploration when the elites agree
    # "final": the distance to the goal after the last block (LeWM's); "min": the nearest the
    # sequence comes to the goal after any of its blocks (reach the goal at any point of the horizon).
    cost: str = "final"
    # Temporal colour of the sampling noise over the horizon (iCEM, Pinneri et al. 2020): 0 white
    # (LeWM's), 2 about a random walk. Correlated samples keep a direction for several blocks and so
    # reach further, which matters when the cost says little far from the goal.
    noise_beta: float = 0.0

    def check(self) -> None:
        if not (1 <= self.elites <= self.candidates) or self.iterations < 1 or self.horizon < 1:
            raise UserError(f"CEM needs 1 <= elites ({self.elites}) <= candidates ({self.candidates}), "
                            f"iterations >= 1 ({self.iterations}) and horizon >= 1 ({self.horizon})")
        if not 0.0 <= self.noise_beta <= 4.0:
            raise UserError(f"the CEM noise colour beta must be in [0, 4], got {self.noise_beta}")
        if self.cost not in COSTS:
            raise UserError(f"unknown planning cost '{self.cost}' (choose from {', '.join(COSTS)})")
