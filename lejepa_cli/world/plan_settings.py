"""What a planning run is asked for: the run's `plan:` section, the named profiles, and the search in blocks.

Torch-free, so the commands can build their options at import (`lejepa --help` stays fast). Every
default is written once: the `plan:` section's (PlanConfig in lejepa_cli/config.py, the `default`
profile, the best setting measured) and LeWM's CEM (CEMConfig's defaults, the `lewm` profile).

    from lejepa_cli.world.plan_settings import PROFILES, choose, search
    settings = choose(run_settings, planner="lewm", horizon=40)   # run's section <- profile <- flags
    cfg = search(settings, frameskip=2)                             # CEMConfig: horizon in blocks

Horizons: the `plan:` section (and `--horizon`) counts environment steps; the planner plans
ceil(steps / frameskip) blocks of frameskip actions, so one number reaches as far in every world.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lejepa_cli.config import PLAN_COSTS as COSTS
from lejepa_cli.config import PlanConfig, config_from_dict
from lejepa_cli.errors import UserError

GOAL_OFFSET = PlanConfig.goal_offset  # goals: the exploration policy's state this many steps after the start (LeWM's evaluation)
LEWM_FRAMESKIP = 5  # LeWM plans blocks of 5 actions: its 5-block horizon reaches 25 environment steps


@dataclass(frozen=True)
class CEMConfig:
    """The search itself, in blocks of frameskip actions; the defaults are LeWM's CEM (300 candidates,
    30 iterations, keep the best 30, horizon 5 blocks, final-latent cost, white noise). Build one from
    a `plan:` section with `search(settings, frameskip)`."""

    candidates: int = 300
    iterations: int = 30
    elites: int = 30
    horizon: int = 5  # blocks of frameskip actions
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


SEARCH_KEYS = ("candidates", "iterations", "elites", "horizon", "cost", "noise_beta")  # what a profile sets
_LEWM = CEMConfig()
# A profile sets the search; the problem (budget, goal_offset) stays the run's.
PROFILES: dict[str, PlanConfig] = {
    "default": PlanConfig(),  # measured on two-room: 95 % of 60 goals at 0.25 s per decision, where LeWM's CEM reaches ~30 %
    "lewm": PlanConfig(candidates=_LEWM.candidates, iterations=_LEWM.iterations, elites=_LEWM.elites,
                       horizon=_LEWM.horizon * LEWM_FRAMESKIP, cost=_LEWM.cost, noise_beta=_LEWM.noise_beta),
}


def horizon_blocks(horizon_steps: int, frameskip: int) -> int:
    """Blocks of `frameskip` actions that cover `horizon_steps` environment steps (rounded up)."""
    return -(-horizon_steps // frameskip)


def search(settings: PlanConfig, frameskip: int) -> CEMConfig:
    """The CEM search of a `plan:` section for a model of this frameskip, checked."""
    cfg = CEMConfig(candidates=settings.candidates, iterations=settings.iterations, elites=settings.elites,
                    horizon=horizon_blocks(settings.horizon, frameskip), cost=settings.cost,
                    noise_beta=settings.noise_beta)
    cfg.check()
    return cfg


def saved_settings(config: dict[str, Any] | None) -> PlanConfig:
    """The `plan:` section of a run's saved config (a checkpoint's or an export's config dict), checked;
    a run from before the section existed plans with the library's defaults."""
    section = (config or {}).get("plan")
    return config_from_dict({"plan": section if isinstance(section, dict) else {}}).plan


def choose(settings: PlanConfig, planner: str | None = None, **flags: Any) -> PlanConfig:
    """`settings` (the run's) <- the named profile's search <- the flags that are not None; `search`
    checks the result."""
    if planner is not None:
        if planner not in PROFILES:
            raise UserError(f"unknown planner profile '{planner}' (choose from {', '.join(PROFILES)})")
        settings = dataclasses.replace(settings, **{k: getattr(PROFILES[planner], k) for k in SEARCH_KEYS})
    return dataclasses.replace(settings, **{k: v for k, v in flags.items() if v is not None})


def describe(settings: PlanConfig, frameskip: int) -> dict[str, Any]:
    """The settings as a report states them: the section's keys and the horizon in blocks."""
    return {**dataclasses.asdict(settings), "horizon_blocks": horizon_blocks(settings.horizon, frameskip)}
