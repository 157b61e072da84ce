"""``platform bench data|moe|train|distill|caption|scale``: each writes a JSON of measurements and ratios against a baseline run alongside."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True)

QuickOpt = Annotated[bool, typer.Option("--quick", help="Smaller sizes, for a fast check.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Where to write the JSON results.")]


@app.command("data")
def data(quick: QuickOpt = False, out: OutOpt = Path("runs/bench/data.json")) -> None:
    """Ray Data pipeline vs a no-framework ceiling and DataLoader+webdataset; padding waste; peak RSS at 1x/10x."""
    import json
    import logging

    from imp_platform.bench.data import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    typer.echo(json.dumps(run(quick, out), indent=2))


@app.command("moe")
def moe(quick: QuickOpt = False, out: OutOpt = Path("runs/bench/moe.json")) -> None:
    """MoE layer fwd+bwd (Expert Choice, top-k) vs a dense FFN of equal active FLOPs and a naive expert loop."""
    import json
    import logging

    from imp_platform.bench.moe import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    result = run(quick, out)
    typer.echo(json.dumps(result["summary"], indent=2))
    typer.echo(f"wrote {out}")


@app.command("train")
def train(quick: QuickOpt = False, out: OutOpt = Path("runs/bench/train.json")) -> None:
    """AGD vs mixed batches and MoE vs dense (equal params per token): tokens/s and zero-shot accuracy."""
    import logging

    from imp_platform.bench.train import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run(quick, out)


@app.command("distill")
def distill(quick: QuickOpt = False, out: OutOpt = Path("runs/bench/distill.json")) -> None:
    """A video+audio teacher distilled into a video-only student vs the student alone: top-1 and ECE."""
    import logging

    from imp_platform.bench.distill import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run(quick, out)


@app.command("caption")
def caption(quick: QuickOpt = False, out: OutOpt = Path("runs/bench/caption.json")) -> None:
    """A tiny CoCa captioner on moving digits: held-out digit/direction word accuracy, KV-cache decoding speedup."""
    import json
    import logging

    from imp_platform.bench.caption import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    result = run(quick, out)
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))
    typer.echo(f"wrote {out}")


@app.command("scale")
def scale(
    quick: QuickOpt = False,
    out: OutOpt = Path("runs/bench/scale.json"),
    preset: Annotated[str | None, typer.Option(
        "--preset", help="Model whose memory per worker is measured (default: small; tiny with --quick).")] = None,
) -> None:
    """replicate vs FSDP vs FSDP+EP at 1, 2 and 4 CPU workers: tokens/s and collective bytes per step, memory per worker."""
    import json
    import logging

    from imp_platform.bench.scale import run
    from imp_platform.cli.common import user_errors

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    with user_errors():
        result = run(quick, out, preset)
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    if result["cores"]["cores_cap"]:
        typer.echo(f"weak_scaling_efficiency {result['weak_scaling_efficiency']}: {result['cores']['cores_cap']}")


@app.command("selftrain")
def selftrain(quick: QuickOpt = False, out: OutOpt = Path("runs/bench/selftrain.json")) -> None:
    """Video-STaR on moving digits, 10% labelled: kept fraction, kept-label and held-out accuracy per round."""
    import logging

    from imp_platform.bench.selftrain import run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run(quick, out)
    typer.echo(f"wrote {out} and {out.with_suffix('.png')}")
