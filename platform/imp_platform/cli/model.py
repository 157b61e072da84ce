"""``platform model ...``: presets, parameter counts, exported weights."""

from __future__ import annotations

import typer

from imp_platform.cli.common import user_errors

app = typer.Typer(no_args_is_help=True)
