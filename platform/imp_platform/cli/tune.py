"""``platform tune --space FILE``: Ray Tune sweeps over pretraining configs."""

from __future__ import annotations

from pathlib import Path

import typer

from imp_platform.cli.common import user_errors


def register(app: typer.Typer) -> None:
    """Add the tune command to the top-level app."""

    @app.command("tune")
    def tune(
        space: Path = typer.Option(..., "--space", help="Sweep YAML (e.g. jobs/mixing.yaml)."),
        overrides: list[str] = typer.Option([], "--set", help="Override a sweep key, e.g. --set num_samples=4."),
        resume: bool = typer.Option(False, "--resume", help="Continue the sweep of the same name (Tuner.restore)."),
    ) -> None:
        """Sweep task mixing weights, expert counts, lr... with Ray Tune; write table, best config, plot."""
        import logging

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        with user_errors():
            from imp_platform.tune.runner import run_sweep_file

            result = run_sweep_file(space, overrides, resume=resume)
        typer.echo(result.summary())
