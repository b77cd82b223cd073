"""The worlds by name: `make_world("two-room", size=64, sets=["noise=0.1"])`, and `gym:ENV_ID` for any
Gymnasium environment (world/gym_world.py; gymnasium is imported only when such a name is used).

Kept apart from sim.py (the World base class and the simulation loop), which every world imports:
the registry imports every world, so sim.py importing it back would close a cycle.
"""

from __future__ import annotations

from typing import Any

from lejepa_cli.errors import UserError
from lejepa_cli.world.balls import Balls
from lejepa_cli.world.push import Push
from lejepa_cli.world.sim import COMMON_OPTIONS, World
from lejepa_cli.world.two_room import TwoRoom


def world_names() -> list[str]:
    return list(_registry())


GYM_PREFIX = "gym:"


def world_class(name: str) -> type[World]:
    if name.startswith(GYM_PREFIX):
        from lejepa_cli.world.gym_world import gym_world_class

        return gym_world_class(name[len(GYM_PREFIX):])
    worlds = _registry()
    if name not in worlds:
        raise UserError(f"unknown world '{name}' (choose from {', '.join(worlds)}, or gym:ENV_ID for a Gymnasium environment)")
    return worlds[name]


def parse_sets(cls: type[World], sets: list[str] | None) -> dict[str, float | int]:
    """`["noise=0.1", "mass_max=4"]` -> typed options of world `cls`; UserError on bad input."""
    spec = {o.name: o for o in (*COMMON_OPTIONS, *cls.options_spec)}
    options: dict[str, float | int] = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set takes key=value, got '{item}'")
        if key not in spec:
            raise UserError(f"world {cls.name} has no option {key} (it has: {', '.join(spec)}; see `lejepa world list`)")
        options[key] = spec[key].parse(value.strip())
    return options


def make_world(name: str, size: int = 64, sets: list[str] | None = None, **options: Any) -> World:
    """A built-in world by name, with `--set key=value` strings and/or keyword options."""
    cls = world_class(name)
    return cls(size=size, **{**parse_sets(cls, sets), **options})


def _registry() -> dict[str, type[World]]:
    return {cls.name: cls for cls in (TwoRoom, Push, Balls)}
