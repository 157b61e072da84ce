"""``platform data ...``: the embedded dataset and the Ray Data preprocessing job."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from imp_platform.cli.common import user_errors

app = typer.Typer(no_args_is_help=True)


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="Dataset root; shards go to OUT/<split>/, the tokenizer to OUT/tokenizer.json.")],
    samples: Annotated[int, typer.Option("--samples", min=1, help="Number of samples.")] = 1000,
    shards: Annotated[int, typer.Option("--shards", min=1, help="Number of tar shards.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (with the split name, fixes every byte).")] = 0,
    split: Annotated[str, typer.Option("--split", help="train, val or test (disjoint digit images).")] = "train",
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Encoder processes (default: all cores).")] = None,
) -> None:
    """Write the moving-digits AV webdataset shards (H.264 mp4, DTMF wav/flac, json caption, png/jpg still)."""
    import logging

    from imp_platform.data.synth import SPLITS, write_dataset

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with user_errors():
        if split not in SPLITS:
            raise typer.BadParameter(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
        summary = write_dataset(out, samples=samples, shards=shards, seed=seed, split=split, workers=workers)
    typer.echo(f"wrote {summary.samples} {split} samples in {len(summary.shards)} shards to {out / split} "
               f"({summary.samples_per_s:.0f} samples/s); tokenizer: {summary.tokenizer}")


@app.command()
def preprocess(
    pipeline: Annotated[Optional[Path], typer.Argument(help="Pipeline YAML (default: the embedded moving-digits pipeline).")] = None,
    input: Annotated[Optional[str], typer.Option("--input", help="Source shards (folder, glob or s3://); replaces source.paths.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="Output folder or s3:// prefix; replaces output.path.")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Override a pipeline key, e.g. --set decode.num_actors=4.")] = None,
) -> None:
    """Decode, bucket and write raw shards with Ray Data; prints buckets, counts and skips."""
    import logging

    from imp_platform.data.manifest import format_summary
    from imp_platform.data.pipeline import load_preprocess_config
    from imp_platform.data.pipeline import preprocess as run_preprocess

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    with user_errors():
        manifest = run_preprocess(load_preprocess_config(pipeline, input, output, overrides))
    typer.echo(format_summary(manifest))
    typer.echo(f"wrote {manifest['output']} in {manifest['timing']['seconds']:.1f}s")


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="A preprocessed dataset (folder or s3:// prefix with manifest.json).")],
) -> None:
    """Print the buckets, counts and skips of a preprocessed dataset."""
    from imp_platform.data.manifest import MANIFEST_NAME, format_summary
    from imp_platform.data.manifest import read as read_manifest

    with user_errors():
        manifest = read_manifest(f"{path.rstrip('/')}/{MANIFEST_NAME}")
    typer.echo(format_summary(manifest))
