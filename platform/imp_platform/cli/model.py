"""``platform model ...``: presets, parameter counts, exported weights."""

from __future__ import annotations

from typing import Annotated

import typer

from imp_platform.cli.common import user_errors

app = typer.Typer(no_args_is_help=True)


@app.command()
def info(
    preset: Annotated[str | None, typer.Option("--preset", help="One preset (default: all).")] = None,
    moe: Annotated[bool | None, typer.Option("--moe/--dense", help="Only MoE or only dense (default: both).")] = None,
) -> None:
    """Print total parameters and parameters per token for the model presets."""
    from rich.console import Console
    from rich.table import Table

    from imp_platform.model.presets import PRESETS, count_params
    from imp_platform.model.presets import preset as make_preset

    with user_errors():
        names = [preset] if preset else list(PRESETS)
        variants = [moe] if moe is not None else [False, True]
        table = Table(title="model presets")
        for column in ("preset", "d_model", "depth", "heads", "mlp", "experts", "total", "per token"):
            table.add_column(column, justify="left" if column == "preset" else "right", no_wrap=True)
        for name in names:
            for sparse in variants:
                try:
                    cfg = make_preset(name, moe=sparse)
                except ValueError as exc:
                    raise typer.BadParameter(str(exc)) from None
                counts = count_params(cfg)
                experts = f"{cfg.moe.num_experts} x last {cfg.moe.last_n}" if cfg.moe.enabled else "-"
                table.add_row(
                    cfg.preset or name, str(cfg.d_model), str(cfg.depth), str(cfg.num_heads), str(cfg.mlp_dim),
                    experts, f"{counts['total'] / 1e6:.1f}M", f"{counts['per_token'] / 1e6:.1f}M",
                )
        Console(width=max(Console().width, 100)).print(table)


@app.command()
def plan(
    preset: Annotated[str, typer.Option("--preset", help="Model preset.")] = "large",
    moe: Annotated[bool, typer.Option("--moe/--dense", help="The preset's MoE or dense variant.")] = False,
    gpus: Annotated[int, typer.Option("--gpus", help="Workers (GPUs) in the run.")] = 8,
    gpu_mem_gb: Annotated[float, typer.Option("--gpu-mem-gb", help="Memory per GPU, GiB.")] = 80.0,
    parallel: Annotated[list[str] | None, typer.Option(
        "--parallel", help="replicate | fsdp | fsdp+ep (repeatable; default all).")] = None,
    expert: Annotated[int | None, typer.Option(
        "--expert", help="Expert-parallel size for fsdp+ep (default: gcd(experts, gpus)).")] = None,
    tokens_per_gpu: Annotated[int, typer.Option(
        "--tokens-per-gpu", help="Encoded tokens per micro-batch per GPU (a task's token_budget; default: its default).")] = 4096,
    fp32: Annotated[bool, typer.Option("--fp32", help="Activations in fp32 (CPU) instead of bf16.")] = False,
) -> None:
    """Per-GPU memory of a training step (params, grads, AdamW state, activations, peak) per parallel layout, and which fit."""
    from rich.console import Console
    from rich.table import Table

    from imp_platform.model import plan as planning
    from imp_platform.model.presets import preset as make_preset

    with user_errors():
        try:
            cfg = make_preset(preset, moe=moe)
            ep = expert or planning.default_expert(cfg, gpus)
            layouts = parallel or [s for s in planning.STRATEGIES if s != "fsdp+ep" or cfg.moe.enabled]
            rows = [planning.plan(cfg, s, gpus, tokens_per_gpu, expert=ep, act_bytes=4 if fp32 else 2) for s in layouts]
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        table = Table(title=f"{cfg.preset} on {gpus} x {gpu_mem_gb:g} GiB, {tokens_per_gpu} tokens per GPU (GiB per GPU)")
        for column in ("parallel", "EP", "params", "grads", "optimizer", "activations", "peak", "fits"):
            table.add_column(column, justify="left" if column == "parallel" else "right", no_wrap=True)
        for row in rows:
            sizes = [f"{getattr(row, k) / planning.GIB:.2f}" for k in ("params", "grads", "optimizer", "activations", "peak")]
            table.add_row(row.strategy, str(row.expert), *sizes, "yes" if row.fits(gpu_mem_gb) else "no")
        Console(width=max(Console().width, 100)).print(table)
        fitting = [row.strategy for row in rows if row.fits(gpu_mem_gb)]
        typer.echo(f"fits (under 90% of {gpu_mem_gb:g} GiB): {', '.join(fitting) or 'none'}")


@app.command()
def merge(
    models: Annotated[list[str], typer.Argument(help="Run checkpoints or exported model dirs (local or s3://).")],
    out: Annotated[str, typer.Option("--out", help="Merged model dir, or the sweep's table + PNG dir.")],
    weights: Annotated[str | None, typer.Option("--weights", help="One per model, summing to 1 (default equal).")] = None,
    sweep: Annotated[str | None, typer.Option("--sweep", help="START:STOP:STEP of alpha, the second model's weight.")] = None,
    evaluate: Annotated[bool, typer.Option("--eval", help="Score each sweep point on the held-out split.")] = False,
    config: Annotated[str | None, typer.Option("--config", help="Pretrain YAML naming the eval data "
                                                                "(default: the first model's run config).")] = None,
    max_samples: Annotated[int | None, typer.Option("--max-samples", help="Cap on held-out samples.")] = None,
    metric: Annotated[list[str] | None, typer.Option("--metric", help="Metric to plot (repeatable).")] = None,
) -> None:
    """Interpolate model weights (UnIVAL): write the merge, or sweep alpha and plot held-out metrics."""
    from imp_platform.config import ConfigError
    from imp_platform.model import merge as merging

    with user_errors():
        if len(models) < 2:
            raise ConfigError(f"merge needs at least two models, got {len(models)}")
        if (sweep is None) != (not evaluate) or (sweep and weights):
            raise ConfigError("use --weights to write one merge, or --sweep with --eval to score interpolations")
        if sweep is None:
            path = merging.merge_models(models, merging.parse_weights(weights, len(models)), out)
            typer.echo(f"wrote {path}")
            return
        alphas = merging.parse_sweep(sweep)
        merging.sweep(models, alphas, merging.eval_config(models, config, max_samples), out, metrics=metric)
        typer.echo(f"wrote {out}/sweep.json, sweep.csv and sweep.png ({len(alphas)} points)")
