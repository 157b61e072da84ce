"""``platform tune --space FILE``: Ray Tune sweeps over pretraining configs."""

from __future__ import annotations

import typer

from imp_platform.cli.common import user_errors


def register(app: typer.Typer) -> None:
    """Add the tune command to the top-level app."""
