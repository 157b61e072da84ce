"""``platform distill`` (CoMD rounds from a distill YAML) and ``platform precompute-teacher``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from imp_platform.cli.common import user_errors


def register(app: typer.Typer) -> None:
    """Add the ``distill`` and ``precompute-teacher`` commands to the top-level app."""

    @app.command()
    def distill(
        config: Annotated[Path, typer.Argument(help="distill YAML (see jobs/configs/distill.yaml).")],
        rounds: Annotated[Optional[int], typer.Option("--rounds", help="Rounds (overrides the YAML).")] = None,
        bidirectional: Annotated[Optional[bool], typer.Option(
            "--bidirectional/--one-way", help="The student also teaches the teacher back each round (CoMD).")] = None,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a key: steps_per_round=50.")] = None,
        out: Annotated[Optional[Path], typer.Option("--out", help="Folder for comd.json + comd.png.")] = None,
    ) -> None:
        """Train a teacher, distil it into a student (and back, bidirectional) for N rounds; metrics + PNG."""
        import logging

        from imp_platform.config.distill import load_distill_config
        from imp_platform.train.comd import run_comd

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        flags = [*([f"rounds={rounds}"] if rounds is not None else []),
                 *([f"bidirectional={str(bidirectional).lower()}"] if bidirectional is not None else [])]
        with user_errors():
            dc = load_distill_config(config, [*(set_ or []), *flags])
            out_dir = out or Path("runs") / dc.name
            result = run_comd(dc, out_dir)
        for row in result["rows"]:
            scores = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith("head_"))
            typer.echo(f"round {row['round']} {row['model']:<8} {scores}")
        typer.echo(f"wrote {out_dir / 'comd.json'} and comd.png")

    @app.command("precompute-teacher")
    def precompute_teacher(
        config: Annotated[Optional[Path], typer.Option("--config", help="pretrain YAML (distill objectives).")] = None,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key (repeatable).")] = None,
    ) -> None:
        """Store each distill teacher's fused logits in its task's processed split (objectives with teacher_column)."""
        import logging

        from imp_platform.config.train import load_pretrain_config
        from imp_platform.train.teacher_outputs import precompute

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        with user_errors():
            for key, rows in precompute(load_pretrain_config(config, set_ or [])).items():
                typer.echo(f"{key}: {rows} rows")
