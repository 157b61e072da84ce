"""``platform infer``: run a checkpoint over shards or a processed split with Ray Data; write parquet."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from imp_platform.cli.common import user_errors


def register(app: typer.Typer) -> None:
    """Add the infer command to the top-level app."""

    @app.command()
    def infer(
        checkpoint: Annotated[str, typer.Option("--checkpoint", help="Run checkpoint or exported model folder.")],
        input: Annotated[str, typer.Option("--input", help="Raw .tar shards (folder, glob, s3://) or a processed split.")],
        out: Annotated[str, typer.Option("--out", help="Output folder: part-*.parquet and summary.json.")],
        what: Annotated[Optional[str], typer.Option(
            "--what", help="Comma-separated: embed, classify, caption, zeroshot (default embed,zeroshot).")] = None,
        pipeline: Annotated[Optional[str], typer.Option(
            "--pipeline", help="Pipeline YAML that decodes raw shards (default: the run's, else the embedded one).")] = None,
        overrides: Annotated[Optional[list[str]], typer.Option(
            "--set", help="Override a pipeline key, e.g. --set decode.num_actors=4 (repeatable).")] = None,
        batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Samples per model forward.")] = None,
        num_actors: Annotated[Optional[int], typer.Option("--num-actors", help="Model replicas (default: one per GPU, else one).")] = None,
        seed: Annotated[Optional[int], typer.Option("--seed", help="Torch seed before every batch.")] = None,
        caption_max_len: Annotated[Optional[int], typer.Option("--caption-max-len", help="Most caption tokens.")] = None,
        beam_size: Annotated[Optional[int], typer.Option("--beam-size", help="Caption beams (1 = greedy).")] = None,
        storage: Annotated[Optional[list[str]], typer.Option("--storage-option", help=(
            "s3fs option for an s3:// checkpoint and --out, e.g. endpoint_url=http://minio:9000 (repeatable)."))] = None,
    ) -> None:
        """Embeddings, zero-shot / head predictions and captions for every good sample, as parquet."""
        import logging

        from imp_platform.config.base import apply_overrides
        from imp_platform.infer.batch import format_summary, infer_config, run_inference

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        with user_errors():
            summary = run_inference(infer_config(checkpoint, input, out, what, pipeline, overrides,
                                                 batch_size=batch_size, num_actors=num_actors, seed=seed,
                                                 caption_max_len=caption_max_len, caption_beam_size=beam_size,
                                                 storage_options=apply_overrides({}, storage) if storage else None))
        typer.echo(format_summary(summary))
