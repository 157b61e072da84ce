"""Sweep distributions -> Ray Tune search-space objects (Tune has no YAML loader of its own)."""

from __future__ import annotations

from typing import Any

from ray import tune

from imp_platform.config.tune import Choice, Grid, LogUniform, RandInt, SweepConfig, Uniform


def to_tune(dist: Uniform | LogUniform | RandInt | Choice | Grid) -> Any:
    """One distribution as the matching ``ray.tune`` domain (or grid-search marker)."""
    if isinstance(dist, Uniform):
        return tune.uniform(dist.low, dist.high)
    if isinstance(dist, LogUniform):
        return tune.loguniform(dist.low, dist.high)
    if isinstance(dist, RandInt):
        return tune.randint(dist.low, dist.high)
    if isinstance(dist, Choice):
        return tune.choice(dist.values)
    return tune.grid_search(dist.values)


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """The Tuner's ``param_space``: flat, keyed by the dotted config path (trials get the same keys)."""
    return {key: to_tune(dist) for key, dist in sweep.space.items()}
