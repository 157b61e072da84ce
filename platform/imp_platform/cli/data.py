"""``platform data ...``: the embedded dataset and the Ray Data preprocessing job."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from imp_platform.cli.common import user_errors

app = typer.Typer(no_args_is_help=True)
