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
