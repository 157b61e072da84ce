"""The ``platform`` command line: thin typer commands that parse arguments and call the library.

Each concern has its own sub-module here (``data``, ``model``, ``train``, ``tune``, ``bench``);
heavy imports (torch, ray) happen inside the commands so ``platform --help`` stays fast.
"""

from __future__ import annotations

import typer

from imp_platform.cli import bench, caption, cluster, data, distill, infer, model, selftrain, train, tune

app = typer.Typer(
    name="platform",
    help="imp-platform: multimodal MoE pretraining with Alternating Gradient Descent on Ray.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(data.app, name="data", help="Synthesize, preprocess and inspect datasets.")
app.add_typer(model.app, name="model", help="Model presets and parameter counts.")
app.add_typer(bench.app, name="bench", help="Benchmarks that write JSON with ratios against in-run baselines.")
app.add_typer(cluster.app, name="cluster", help="A local Ray head for `ray job submit`, token auth on.")
train.register(app)
tune.register(app)
infer.register(app)
caption.register(app)
distill.register(app)
selftrain.register(app)


def main() -> None:
    app()
