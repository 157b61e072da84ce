"""``platform caption``: generate captions for a processed split with a trained CoCa checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from imp_platform.cli.common import user_errors


def register(app: typer.Typer) -> None:
    """Add the ``caption`` command to the top-level app."""

    @app.command()
    def caption(
        checkpoint: Annotated[str, typer.Option("--checkpoint", help="Run checkpoint or exported model directory.")],
        input_: Annotated[str, typer.Option("--input", help="A processed split (folder with manifest.json).")],
        out: Annotated[Path, typer.Option("--out", help="captions.jsonl to write (key, caption, reference, label).")],
        tokenizer: Annotated[Optional[str], typer.Option(
            "--tokenizer", help="tokenizer.json (default: the checkpoint's run's training tokenizer).")] = None,
        max_len: Annotated[int, typer.Option("--max-len", min=1, help="Most tokens per caption.")] = 16,
        beam_size: Annotated[int, typer.Option("--beam-size", min=1, help="1 = greedy.")] = 1,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
        max_samples: Annotated[Optional[int], typer.Option("--max-samples", help="Cap on captioned clips.")] = None,
        storage: Annotated[Optional[list[str]], typer.Option("--storage-option", help=(
            "s3fs option for an s3:// checkpoint or input, e.g. endpoint_url=http://minio:9000 (repeatable).")
        )] = None,
    ) -> None:
        """Greedy or beam-search captions per clip, plus token accuracy / exact match / label-word accuracy."""
        import json

        from imp_platform.config.base import apply_overrides
        from imp_platform.eval.captioning import caption_checkpoint

        with user_errors():
            metrics = caption_checkpoint(checkpoint, input_, str(out), tokenizer=tokenizer, batch_size=batch_size,
                                         max_len=max_len, beam_size=beam_size, max_samples=max_samples,
                                         storage_options=apply_overrides({}, storage))
        typer.echo(json.dumps(metrics, indent=2))
        typer.echo(f"wrote {out}")
