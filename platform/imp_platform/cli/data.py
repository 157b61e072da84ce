"""``platform data ...``: the embedded dataset, the caption tokenizer, the Ray Data preprocessing job, inspection."""

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
def tokenizer(
    inputs: Annotated[list[str], typer.Option("--input", help="Shards to read captions from (folder, glob or s3://); repeatable.")],
    out: Annotated[str, typer.Option("--out", help="tokenizer.json to write (local or s3://); point text.tokenizer at it.")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", min=16, help="Vocabulary size; at most the model's vocab_size (tiny: 1024).")] = 1024,
    kind: Annotated[str, typer.Option("--kind", help="wordpiece or bpe.")] = "wordpiece",
    caption_key: Annotated[str, typer.Option("--caption-key", help="The json field holding the caption (string or list).")] = "caption",
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="storage_options.KEY=VALUE for s3:// inputs, e.g. --set storage_options.endpoint_url=http://minio:9000.")] = None,
) -> None:
    """Train a lower-cased WordPiece/BPE tokenizer ([PAD]=0, [UNK]=1) on the captions of tar shards."""
    import logging

    from imp_platform.config.base import apply_overrides
    from imp_platform.data.dataset import build_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with user_errors():
        if kind not in ("wordpiece", "bpe"):
            raise typer.BadParameter(f"--kind must be wordpiece or bpe, got {kind!r}")
        storage_options = apply_overrides({}, overrides).get("storage_options", {})
        stats = build_tokenizer(inputs, out, vocab_size, kind, caption_key, storage_options)
    typer.echo(f"wrote {out}: {kind} tokenizer from {stats.captions} captions in {stats.shards} shards "
               f"({stats.samples_without_caption} samples without a caption)")


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="A preprocessed split (folder or s3:// prefix with manifest.json), or a folder of splits.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for card.json and contact_sheet_<split>.png.")] = None,
    per_bucket: Annotated[int, typer.Option("--per-bucket", min=1, help="Samples per bucket on the contact sheet.")] = 2,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="storage_options.KEY=VALUE for an s3:// path.")] = None,
) -> None:
    """Print the dataset card (samples per bucket, class and split; skips; bytes per sample) and draw a contact sheet."""
    from imp_platform.config.base import apply_overrides
    from imp_platform.data.inspection import format_cards
    from imp_platform.data.inspection import inspect as inspect_data

    with user_errors():
        storage_options = apply_overrides({}, overrides).get("storage_options", {})
        cards, sheets = inspect_data(path, out, storage_options, per_bucket)
    typer.echo(format_cards(cards))
    for sheet in sheets:
        typer.echo(f"contact sheet: {sheet}")
