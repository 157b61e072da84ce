"""``platform selftrain``: Video-STaR rounds from a selftrain YAML (see jobs/configs/selftrain.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from imp_platform.cli.common import user_errors


def register(app: typer.Typer) -> None:
    """Add the ``selftrain`` command to the top-level app."""

    @app.command()
    def selftrain(
        config: Annotated[Path, typer.Argument(help="selftrain YAML (see jobs/configs/selftrain.yaml).")],
        rounds: Annotated[Optional[int], typer.Option("--rounds", help="Rounds after round 0 (overrides YAML).")] = None,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: steps_per_round=50.")] = None,
        out: Annotated[Optional[Path], typer.Option("--out", help="Folder for selftrain.json + selftrain.png.")] = None,
    ) -> None:
        """Caption and label unlabelled clips, keep those consistent with their weak labels, fine-tune; per round."""
        import logging

        from imp_platform.config.selftrain import load_selftrain_config
        from imp_platform.selftrain.rounds import PLOT_NAME, RESULT_NAME, format_rounds, run_selftrain

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        with user_errors():
            sc = load_selftrain_config(config, [*(set_ or []), *([f"rounds={rounds}"] if rounds is not None else [])])
            out_dir = out or Path("runs") / sc.name
            result = run_selftrain(sc, out_dir)
        typer.echo(format_rounds(result))
        typer.echo(f"wrote {out_dir / RESULT_NAME} and {PLOT_NAME}")
