"""``platform pretrain``, ``platform eval`` and ``platform demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from imp_platform.cli.common import user_errors

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="pretrain YAML (default: the embedded demo).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: run.steps=100 (repeatable).")]


def register(app: typer.Typer) -> None:
    """Add the training commands to the top-level app."""

    @app.command()
    def pretrain(config: ConfigOpt = None, set_: SetOpt = None) -> None:
        """AGD pretraining on Ray Train (synth + preprocess first when the data is missing), then eval + report."""
        from imp_platform.train.entry import run_pretrain

        with user_errors():
            run_pretrain(config, set_ or [])

    @app.command("eval")
    def eval_(
        checkpoint: Annotated[str, typer.Option("--checkpoint", help="Checkpoint directory (local or s3://).")],
        out: Annotated[Optional[Path], typer.Option("--out", help="Output folder for metrics.json + report.png.")] = None,
        max_samples: Annotated[Optional[int], typer.Option("--max-samples", help="Cap on held-out samples.")] = None,
    ) -> None:
        """Zero-shot classification and retrieval on the checkpoint's held-out split."""
        from imp_platform.train.entry import run_eval

        with user_errors():
            run_eval(checkpoint, out, max_samples)

    @app.command()
    def demo(set_: SetOpt = None) -> None:
        """The embedded default end to end (same as `make demo`)."""
        from imp_platform.train.entry import run_pretrain

        with user_errors():
            run_pretrain(None, set_ or [])
