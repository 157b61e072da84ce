"""``platform pretrain``, ``platform eval`` and ``platform demo``."""

from __future__ import annotations

import typer

from imp_platform.cli.common import user_errors


def register(app: typer.Typer) -> None:
    """Add the training commands to the top-level app."""
