"""Video-STaR rounds: infer on the unlabelled split, keep, write shards, preprocess, fine-tune, evaluate.

Round 0's model is the given checkpoint, or a run trained on the seed split alone. Row r of
``selftrain.json`` describes model r: its held-out eval, and what its own predictions keep of
the unlabelled split (kept fraction, kept-label accuracy against the split's labels). Model
r + 1 is model r fine-tuned (``model.init_from``, fresh optimizer) on the split
``<name>-r<r+1>``: the seed shards plus model r's kept samples, preprocessed by the normal
pipeline. Inference is ``platform infer``'s Ray Data path over the processed unlabelled split,
training and eval the pretrain path's (Ray Train, final held-out eval, PNG report).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from imp_platform.config import ConfigError, validate
from imp_platform.config.infer import InferConfig
from imp_platform.config.selftrain import SelfTrainConfig
from imp_platform.config.train import PretrainConfig, load_pretrain_config
from imp_platform.selftrain.keep import Kept, select

log = logging.getLogger(__name__)

RESULT_NAME = "selftrain.json"
PLOT_NAME = "selftrain.png"
HELDOUT_LOGGED = ("caption_", "zeroshot_", "head_")  # the held-out eval's scalars copied into each round's row


def round_config(base: PretrainConfig, sc: SelfTrainConfig, split: str, rnd: int, steps: int,
                 init_from: str | None) -> PretrainConfig:
    """The pretrain run of round ``rnd``: every task on ``split``, started from ``init_from``.

    Round 0 follows ``round0_curriculum`` (the base's own when the base's tasks are trained);
    fine-tuning rounds run the tasks at their own rates.
    """
    data = base.model_dump(mode="json")
    tasks = sc.tasks if sc.tasks is not None else base.tasks
    data["tasks"] = {name: {**t.model_dump(mode="json", exclude_none=True), "split": split}
                     for name, t in tasks.items()}
    data["data"]["train_split"] = split
    if rnd > 0 or sc.tasks is not None:
        data["agd"]["curriculum"] = [s.model_dump(mode="json") for s in sc.round0_curriculum] if rnd == 0 else []
    if sc.model is not None:
        data["model"] = sc.model.model_dump(mode="json")
    data["model"]["init_from"] = init_from
    data["run"].update(name=f"{sc.name}-r{rnd}", steps=steps)
    return validate(PretrainConfig, data, source=f"selftrain round {rnd}")


def heldout_metrics(cfg: PretrainConfig, checkpoint: str) -> dict[str, Any]:
    """The held-out eval of a given checkpoint (round 0 when it is not trained here)."""
    from imp_platform.eval.zeroshot import HeldOut
    from imp_platform.train.checkpoint import load_model

    model, _ = load_model(checkpoint)
    return HeldOut.open(cfg).run(model).as_json()


def infer_and_keep(sc: SelfTrainConfig, checkpoint: str, unlabeled: str, out: Path) -> Kept:
    """Captions and ``sc.predict`` of every unlabelled sample (``platform infer``), then the keep filter."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from imp_platform.infer.batch import run_inference

    cfg = validate(InferConfig, {
        "checkpoint": checkpoint, "input": unlabeled, "out": str(out), "what": ["caption", sc.prediction_what],
        "batch_size": sc.infer_batch_size, "caption_max_len": sc.caption_max_len}, source="selftrain inference")
    summary = run_inference(cfg)
    if not summary["classes"]:
        raise ConfigError(f"{unlabeled}: the dataset declares no classes (dataset.classes in the pipeline YAML), so "
                          "weak labels have no words to check")
    parts = [pq.read_table(out / f["path"]) for f in summary["files"]]
    if not parts:
        return Kept([], [], [], 0, None)
    return select(pa.concat_tables(parts), sc.keep, sc.predict, summary["classes"])


def preprocess_round(base: PretrainConfig, sources: list[str], split: str) -> dict[str, Any]:
    """Seed + kept shards through the base's pipeline into ``ROOT/processed/<split>``; returns the manifest."""
    from imp_platform.config.pipeline import load_pipeline
    from imp_platform.data.pipeline import preprocess

    pipeline = load_pipeline(base.data.pipeline, [f"source.paths={json.dumps(sources)}",
                                                  f"output.path={base.data.processed_path(split)}"])
    return preprocess(pipeline)


def round_model(base: PretrainConfig, sc: SelfTrainConfig, rnd: int, previous: str | None,
                kept_sources: list[str]) -> tuple[str, dict[str, Any], int]:
    """Model ``rnd``: (checkpoint, held-out metrics, training samples). Round 0 trains on the seed
    split unless ``previous`` (the given checkpoint) is set; round r > 0 fine-tunes ``previous``
    on the seed shards plus ``kept_sources``, preprocessed into the split ``<name>-r<r>``."""
    from imp_platform.data import manifest as manifest_io
    from imp_platform.train.comd import train
    from imp_platform.train.trainer import prepare_data

    if rnd > 0:
        split = f"{sc.name}-r{rnd}"
        samples = preprocess_round(base, [f"{base.data.raw_root}/{sc.seed_split}", *kept_sources], split)["kept"]
        done = train(round_config(base, sc, split, rnd, sc.steps_per_round, previous))
        return done.checkpoint, done.metrics, samples
    cfg = round_config(base, sc, sc.seed_split, 0, sc.round0_steps, None)
    if previous is None:
        done = train(cfg)
        checkpoint, metrics = done.checkpoint, done.metrics
    else:
        prepare_data(cfg)
        checkpoint, metrics = previous, heldout_metrics(cfg, previous)
    manifest = manifest_io.read(f"{cfg.data.processed_path(sc.seed_split)}/{manifest_io.MANIFEST_NAME}",
                                cfg.data.storage_options)
    return checkpoint, metrics, manifest["kept"]


def run_selftrain(sc: SelfTrainConfig, out_dir: str | Path) -> dict[str, Any]:
    """Every round; writes ``selftrain.json`` (after each round) and ``selftrain.png`` into ``out_dir``."""
    from imp_platform.config.pipeline import load_pipeline
    from imp_platform.data.dataset import read_tokenizer
    from imp_platform.selftrain.shards import write_kept
    from imp_platform.train.trainer import ensure_ray, prepare_data

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    base = load_pretrain_config(sc.base, sc.base_overrides).with_absolute_paths()
    ensure_ray(base)
    prepare_data(round_config(base, sc, sc.unlabeled_split, 0, 1, None))  # the unlabelled split, processed once
    unlabeled = base.data.processed_path(sc.unlabeled_split)
    pipeline = load_pipeline(base.data.pipeline)
    rows: list[dict[str, Any]] = []
    payload: dict[str, Any] = {"name": sc.name, "rounds": rows, "predict": sc.predict,
                               "keep": sc.keep.model_dump(mode="json"), "heldout_metric": sc.heldout_metric}
    checkpoint = sc.checkpoint
    kept_sources: list[str] = []  # the previous round's kept-shard folder, when it kept anything
    for rnd in range(sc.rounds + 1):
        began = time.perf_counter()
        checkpoint, metrics, train_samples = round_model(base, sc, rnd, checkpoint, kept_sources)
        log.info("selftrain %s: round %d, inferring on %s", sc.name, rnd, unlabeled)
        kept = infer_and_keep(sc, checkpoint, unlabeled, out_dir / f"round-{rnd}" / "predictions")
        kept_dir = out_dir / f"round-{rnd}" / "kept"
        kept_shards = []
        if rnd < sc.rounds and kept.keys:
            kept_shards = write_kept(f"{base.data.raw_root}/{sc.unlabeled_split}", kept, pipeline, kept_dir,
                                     read_tokenizer(base, sc.unlabeled_split), sc.samples_per_shard)
        kept_sources = [str(kept_dir)] if kept_shards else []
        rows.append({"round": rnd, "checkpoint": checkpoint, "train_samples": train_samples, "kept": len(kept.keys),
                     "inferred": kept.total, "kept_frac": kept.kept_frac,
                     "kept_label_accuracy": kept.kept_label_accuracy, "kept_shards": [str(p) for p in kept_shards],
                     "heldout_top1": metrics.get(sc.heldout_metric),
                     **{k: v for k, v in metrics.items()
                        if k.startswith(HELDOUT_LOGGED) and isinstance(v, (int, float))},
                     "wall_s": round(time.perf_counter() - began, 1)})
        log.info("selftrain %s: round %d kept %d/%d (label accuracy %s), held-out %s %s", sc.name, rnd,
                 len(kept.keys), kept.total, kept.kept_label_accuracy, sc.heldout_metric, rows[-1]["heldout_top1"])
        (out_dir / RESULT_NAME).write_text(json.dumps(payload, indent=2))
    write_plot(rows, out_dir / PLOT_NAME, title=f"{sc.name}: {sc.rounds} self-training round(s), keep by {sc.predict}")
    return payload


PLOTTED = (("kept_frac", "kept fraction"), ("kept_label_accuracy", "kept-label accuracy"),
           ("heldout_top1", "held-out top-1"), ("caption_label_word_accuracy", "held-out caption names the label"))


def write_plot(rows: list[dict[str, Any]], out: Path, title: str) -> Path:
    """Kept fraction, kept-label accuracy, held-out top-1 and captioning against the round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for key, label in PLOTTED:
        points = [(r["round"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set(xlabel="round", ylabel="fraction", ylim=(0, 1.05), xticks=[r["round"] for r in rows], title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def format_rounds(result: dict[str, Any]) -> str:
    """One line per round: kept share, kept-label accuracy, held-out figure."""

    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    return "\n".join(f"round {r['round']}: kept {r['kept']}/{r['inferred']} ({fmt(r['kept_frac'])}), kept-label "
                     f"accuracy {fmt(r['kept_label_accuracy'])}, held-out {result['heldout_metric']} "
                     f"{fmt(r['heldout_top1'])}" for r in result["rounds"])
