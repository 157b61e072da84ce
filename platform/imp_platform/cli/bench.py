"""``platform bench data|moe|train``: each writes a JSON of measurements and ratios against a baseline run alongside."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True)

QuickOpt = Annotated[bool, typer.Option("--quick", help="Smaller sizes, for a fast check.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Where to write the JSON results.")]
