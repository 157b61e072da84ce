"""What a sweep leaves behind: a trial table, the best config as a pretrain YAML, a metric plot.

Each row shows, beside the swept values and the metric, the metric's held-out components,
the model's cost (total and per-token parameters) and the task mix the trial really ran
(``steps_frac_<task>``, and in the CSV ``samples_<task>``), so a reader can check that the
swept mix acted and read accuracy against cost.

"Stopped early" is read from the trial itself (its last reported ``step`` is short of the
sweep's budget without an error), so it holds for a restored experiment too. The best trial
is chosen among those that ran the full budget when there are any: a trial the scheduler cut
at an early rung was measured after fewer steps and is not comparable.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imp_platform.config import dump_yaml
from imp_platform.config.train import PretrainConfig
from imp_platform.config.tune import Choice, Grid, LogUniform, SweepConfig
from imp_platform.tune.trial import sampled_config, swept_values

log = logging.getLogger(__name__)

# Reported columns a row keeps: held-out metrics, model cost, realised mix.
COMPONENTS = re.compile(r"heldout_score|val_loss|zeroshot_.+_top1|retrieval_.+_r1")
COST = ("params_total", "params_per_token")
MIX = re.compile(r"steps_frac_.+|samples_.+")


@dataclass
class TrialRow:
    trial_id: str
    values: dict[str, Any]
    metric: float | None
    steps: int
    stopped_early: bool
    status: str  # "completed", "stopped", "error"
    error: str | None = None
    columns: dict[str, float] = field(default_factory=dict)  # last report's components, cost and mix
    curve: list[dict[str, float]] = field(default_factory=list)  # one entry per report: step, metric, mix


@dataclass
class SweepResult:
    experiment_path: str
    rows: list[TrialRow]
    best: TrialRow | None
    report_dir: Path
    table_path: Path
    best_config_path: Path | None
    plot_path: Path | None
    restored: bool = False

    @property
    def num_stopped_early(self) -> int:
        return sum(row.stopped_early for row in self.rows)

    def summary(self) -> str:
        """A few lines for the terminal: counts, best trial, where the files are."""
        lines = [f"sweep {self.experiment_path}: {len(self.rows)} trials, {self.num_stopped_early} stopped early"
                 + (" (restored)" if self.restored else "")]
        if self.best is not None:
            lines.append(f"best trial {self.best.trial_id}: {self.best.metric:.4g} with {self.best.values}")
        lines += [f"table: {self.table_path}", f"best config: {self.best_config_path}", f"plot: {self.plot_path}"]
        return "\n".join(lines)


def collect_rows(grid: Any, sweep: SweepConfig) -> list[TrialRow]:
    """One row per trial of a ``ray.tune.ResultGrid``."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        steps = int(metrics.get("step", 0))
        value = metrics.get(sweep.metric)
        metric = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
        error = repr(result.error) if result.error else None
        stopped = error is None and steps < sweep.steps
        status = "error" if error else "stopped" if stopped else "completed"
        trial_id = str(metrics.get("trial_id") or Path(result.path).name)
        rows.append(TrialRow(trial_id, swept_values(result.config or {}, sweep), metric, steps, stopped, status, error,
                             kept_columns(metrics), learning_curve(result, sweep)))
    return sorted(rows, key=lambda row: row.trial_id)


def _kept(key: str) -> bool:
    return bool(COMPONENTS.fullmatch(key) or MIX.fullmatch(key)) or key in COST


def kept_columns(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a report worth a table column (see COMPONENTS, COST, MIX)."""
    return {key: float(value) for key, value in metrics.items()
            if _kept(key) and isinstance(value, (int, float)) and not isinstance(value, bool)}


def learning_curve(result: Any, sweep: SweepConfig) -> list[dict[str, float]]:
    """Every report of a trial (step, the metric, the realised mix so far), oldest first."""
    frame = result.metrics_dataframe
    if frame is None or "step" not in frame:
        return []
    wanted = [c for c in frame.columns if c in ("step", sweep.metric) or MIX.fullmatch(str(c))]
    return [{key: float(value) for key, value in record.items() if value == value}  # drop NaN
            for record in frame[wanted].to_dict("records")]


def pick_best(rows: list[TrialRow], sweep: SweepConfig) -> TrialRow | None:
    measured = [row for row in rows if row.metric is not None and row.error is None]
    pool = [row for row in measured if not row.stopped_early] or measured
    if not pool:
        return None
    sign = 1.0 if sweep.mode == "min" else -1.0
    return min(pool, key=lambda row: sign * row.metric)  # type: ignore[operator]


def write_report(rows: list[TrialRow], sweep: SweepConfig, base: PretrainConfig, out_dir: Path,
                 experiment_path: str, restored: bool = False) -> SweepResult:
    """Table (CSV + Markdown), best config YAML and the metric plot under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    best = pick_best(rows, sweep)
    table = _write_table(rows, sweep, best, out_dir)
    best_path = None
    if best is not None:
        cfg = sampled_config(base, best.values, name=f"{sweep.name}-best")
        best_path = dump_yaml(cfg, out_dir / "best.yaml")
        log.info("best trial %s: %s=%.4g; config %s", best.trial_id, sweep.metric, best.metric, best_path)
    plot = _plot(rows, sweep, best, out_dir / "metric_vs_params.png") if any(r.metric is not None for r in rows) else None
    return SweepResult(experiment_path, rows, best, out_dir, table, best_path, plot, restored)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # parameter and sample counts in full
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table_columns(rows: list[TrialRow], sweep: SweepConfig, markdown: bool) -> list[str]:
    """Reported columns, in reading order: metric components, cost, realised mix (samples: CSV only)."""
    present = {key for row in rows for key in row.columns} - {sweep.metric}
    components = sorted(k for k in present if COMPONENTS.fullmatch(k))
    mix = sorted(k for k in present if k.startswith("steps_frac_"))
    samples = [] if markdown else sorted(k for k in present if k.startswith("samples_"))
    return [*components, *(k for k in COST if k in present), *mix, *samples]


def table_lines(rows: list[TrialRow], sweep: SweepConfig, best: TrialRow | None, markdown: bool) -> list[list[str]]:
    """Header and one line per trial, sorted by the metric (best first, unmeasured trials last)."""
    keys, extra = list(sweep.space), table_columns(rows, sweep, markdown)
    sign = 1.0 if sweep.mode == "min" else -1.0
    ordered = sorted(rows, key=lambda r: (r.metric is None, sign * r.metric if r.metric is not None else 0.0))
    header = ["trial", *keys, sweep.metric, *extra, "steps", "stopped_early", "status"]
    return [header, *([row.trial_id + (" *" if row is best else ""), *(_fmt(row.values.get(k)) for k in keys),
                       _fmt(row.metric), *(_fmt(row.columns.get(k)) for k in extra), str(row.steps),
                       "yes" if row.stopped_early else "no", row.status] for row in ordered)]


def _write_table(rows: list[TrialRow], sweep: SweepConfig, best: TrialRow | None, out_dir: Path) -> Path:
    with (out_dir / "trials.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(table_lines(rows, sweep, best, markdown=False))
    header, *lines = table_lines(rows, sweep, best, markdown=True)
    markdown = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                          *("| " + " | ".join(line) + " |" for line in lines)])
    path = out_dir / "trials.md"
    path.write_text(f"# sweep {sweep.name}: {sweep.metric} ({sweep.mode}), budget {sweep.steps} steps\n\n"
                    f"{markdown}\n\n`*` = best trial\n")
    log.info("sweep %s trials:\n%s", sweep.name, markdown)
    return path


def _plot(rows: list[TrialRow], sweep: SweepConfig, best: TrialRow | None, path: Path) -> Path:
    """One panel per swept key (final metric against the sampled value; stopped trials as crosses),
    then the best trial's learning curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(sweep.space)
    panels = len(keys) + 1
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.4), squeeze=False)
    _plot_curve(axes[0][-1], best, sweep)
    measured = [row for row in rows if row.metric is not None]
    for ax, key in zip(axes[0][:-1], keys, strict=True):
        dist = sweep.space[key]
        categorical = isinstance(dist, (Choice, Grid)) and not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in dist.values)
        labels = [str(v) for v in dist.values] if categorical else []  # type: ignore[union-attr]

        def x_of(row: TrialRow) -> float:
            value = row.values.get(key)
            return float(labels.index(str(value))) if categorical else float(value)

        for stopped, marker, label in ((False, "o", "ran full budget"), (True, "x", "stopped early")):
            points = [row for row in measured if row.stopped_early == stopped]
            if points:
                ax.scatter([x_of(r) for r in points], [r.metric for r in points], marker=marker, label=label)
        if best is not None and best.metric is not None:
            ax.scatter([x_of(best)], [best.metric], s=160, facecolors="none", edgecolors="red", label="best")
        if categorical:
            ax.set_xticks(range(len(labels)), labels)
        elif isinstance(dist, (Choice, Grid)):
            ax.set_xticks(sorted(set(dist.values)))
        elif isinstance(dist, LogUniform):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(sweep.metric)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{sweep.name}: {sweep.metric} ({sweep.mode}) per trial")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_curve(ax: Any, best: TrialRow | None, sweep: SweepConfig) -> None:
    """The metric at each report of the best trial (empty panel with a note when there is none)."""
    points = [(p["step"], p[sweep.metric]) for p in (best.curve if best else []) if sweep.metric in p]
    if points:
        ax.plot(*zip(*points, strict=True), marker="o")
    else:
        ax.text(0.5, 0.5, "no best trial", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel(sweep.metric)
    ax.set_title(f"best trial {best.trial_id}" if best else "best trial", fontsize="small")
