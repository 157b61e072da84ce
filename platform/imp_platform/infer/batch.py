"""Batch inference on Ray Data: decoded rows -> a ``map_batches`` pool of model actors -> parquet.

One streaming pass, so the input may be far larger than memory: Ray Data reads and decodes
ahead of the model actors (one model each, GPU actors when the cluster has GPUs) and the
driver writes each prediction block as it arrives. Ray Data keeps the input order
(``preserve_order``), so the model sees the same batches every run and a seed gives the same
bytes. Bad samples are skipped and counted exactly as preprocess counts them (the decode
step's skip records, the manifest's ``TaskReport`` and ``build``) in ``OUT/summary.json``;
the parquet holds one row per good sample.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imp_platform.config import ConfigError, validate
from imp_platform.config.infer import InferConfig
from imp_platform.config.model import ModelConfig
from imp_platform.data import manifest as manifest_io
from imp_platform.data.sources import absolute, filesystem, join
from imp_platform.infer.inputs import InferenceInput, open_input
from imp_platform.infer.predictor import SKIP_DETAIL, SKIP_KIND, Predictor, PredictorSpec

if TYPE_CHECKING:
    from imp_platform.config.train import PretrainConfig

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"
PART_NAME = "part-{:05d}.parquet"


def _checkpoint(path: str) -> tuple[Path, ModelConfig, PretrainConfig | None]:
    """(directory, model config, run config or None) of a run checkpoint or an exported model."""
    from imp_platform.model.io import CONFIG
    from imp_platform.train.checkpoint import RUN_CONFIG, load_run_config, verify_model_dir

    directory = verify_model_dir(path)  # a run checkpoint's files are all whole (weights may be DCP shards)
    model_cfg = validate(ModelConfig, json.loads((directory / CONFIG).read_text()), source=str(directory / CONFIG))
    run_cfg = load_run_config(directory) if (directory / RUN_CONFIG).exists() else None
    return directory.resolve(), model_cfg, run_cfg


@contextlib.contextmanager
def local_checkpoint(uri: str, storage_options: dict[str, Any] | None) -> Iterator[str]:
    """A checkpoint URI as a local directory: a local path as given, an s3:// one downloaded for the
    block by the code that resumes training from one (``ray_checkpoint``). Missing: FileNotFoundError naming ``uri``."""
    from imp_platform.train.checkpoint import ray_checkpoint

    if "://" not in uri:
        yield uri
        return
    try:
        with ray_checkpoint(uri, storage_options).as_directory() as directory:
            yield directory
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{uri}: not found, or not a checkpoint or exported model ({exc})") from None


def _heads(model_cfg: ModelConfig, run_cfg: PretrainConfig | None) -> dict[str, str]:
    """Classification head -> the modality it reads (the run's tasks with labels: one head each, as the model got)."""
    from imp_platform.train.tasks import head_modalities

    if run_cfg is None:
        raise ConfigError("--what classify needs a run checkpoint: its pretrain.yaml names the modality of each head "
                          "(an exported model has heads but not what they read)")
    return {h: m for h, m in head_modalities(run_cfg).items() if h in model_cfg.heads}


def check_model(cfg: InferConfig, directory: Path, model_cfg: ModelConfig,
                run_cfg: PretrainConfig | None) -> dict[str, str]:
    """Refuse at once what the model cannot produce; returns the classification heads to run."""
    if "caption" in cfg.what and not getattr(getattr(model_cfg, "decoder", None), "enabled", False):
        raise ConfigError(f"--what caption: the model in {directory} has no text decoder")
    return _heads(model_cfg, run_cfg) if "classify" in cfg.what else {}


def predictor_spec(cfg: InferConfig, checkpoint: str, heads: dict[str, str], source: InferenceInput) -> PredictorSpec:
    """What every model actor gets (``checkpoint``: a local directory or the s3:// URI, which each actor
    downloads); refuses what the input cannot give (classes, a tokenizer), naming why."""
    from imp_platform.data.decode import load_tokenizer
    from imp_platform.eval.zeroshot import prompt_tokens

    what = tuple(cfg.what)
    prompts = None
    if ("zeroshot" in what or "caption" in what) and source.tokenizer_json is None:
        raise ConfigError("--what zeroshot/caption needs the tokenizer (text.tokenizer in the pipeline YAML)")
    if "zeroshot" in what:
        if source.card.classes is None:
            raise ConfigError("--what zeroshot needs class names: declare dataset.classes in the pipeline YAML")
        prompts = prompt_tokens(source.card, load_tokenizer(source.tokenizer_json), source.prompt_length)
    return PredictorSpec(
        checkpoint=checkpoint, storage_options=cfg.storage_options, what=what, modalities=source.modalities,
        batch_size=cfg.batch_size, seed=cfg.seed, heads={h: m for h, m in heads.items() if m in source.modalities},
        prompts=prompts, num_classes=source.card.num_classes, tokenizer_json=source.tokenizer_json,
        caption_max_len=cfg.caption_max_len, caption_beam_size=cfg.caption_beam_size,
    )


def predictions(source: InferenceInput, spec: PredictorSpec, num_actors: int | None) -> Any:
    """The lazy dataset of prediction rows: the input graph plus the model actor pool, order kept.

    An actor call gets ``batch_size`` decoded samples (a processed split's blocks go whole: one
    bucket each, which would not concatenate with another bucket's).
    """
    import ray
    from ray.data import ActorPoolStrategy, ExecutionResources

    ds = source.dataset
    context = ds.context
    limits = context.execution_options.resource_limits
    bounded = limits.cpu != float("inf")  # the decode stage caps its CPUs (data.pipeline._limit_resources)
    cluster = ray.cluster_resources()
    gpus = int(cluster.get("GPU", 0))
    actors = num_actors or max(1, gpus)
    if gpus:
        resources = {"num_gpus": 1, "num_cpus": 1}
    else:  # what the decode stage left, so the pool never waits for a CPU that does not exist
        free = float(cluster.get("CPU", 1.0)) - (limits.cpu if bounded else 0.0)
        resources = {"num_cpus": min(1.0, max(0.1, free / actors))}
    out = ds.map_batches(Predictor, fn_constructor_args=(spec,),
                         batch_size=spec.batch_size if source.kind == "shards" else None,
                         batch_format="numpy", compute=ActorPoolStrategy(size=actors), **resources)
    context.execution_options.preserve_order = True
    if bounded:
        context.execution_options.resource_limits = ExecutionResources(
            cpu=limits.cpu + actors * resources["num_cpus"], gpu=actors * resources.get("num_gpus", 0),
            object_store_memory=limits.object_store_memory)
    log.info("infer: %d model actor(s), %s each", actors, resources)
    return out


class PartWriter:
    """Writes prediction tables as ``OUT/part-NNNNN.parquet``, a new file every ``rows_per_file`` rows."""

    def __init__(self, out: str, storage_options: dict[str, Any], rows_per_file: int) -> None:
        self.fs, self.base = filesystem(out, storage_options)
        self.rows_per_file = rows_per_file
        self.files: list[dict[str, Any]] = []
        self._writer: Any = None
        self._handle: Any = None

    def write(self, table: Any) -> None:
        import pyarrow.parquet as pq

        while table.num_rows:
            if self._writer is None:
                name = PART_NAME.format(len(self.files))
                self._handle = self.fs.open(join(self.base, name), "wb")
                self._writer = pq.ParquetWriter(self._handle, table.schema)
                self.files.append({"path": name, "rows": 0})
            room = self.rows_per_file - self.files[-1]["rows"]
            self._writer.write_table(table.slice(0, room))
            self.files[-1]["rows"] += min(room, table.num_rows)
            table = table.slice(room)
            if self.files[-1]["rows"] >= self.rows_per_file:
                self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._handle.close()
            self._writer = self._handle = None


def _clear(fs: Any, base: str) -> None:
    """Remove an earlier run's parts and summary, so the folder holds this run's output only."""
    fs.makedirs(base, exist_ok=True)
    stale = [p for p in fs.ls(base, detail=False)
             if p.rstrip("/").rsplit("/", 1)[-1].startswith("part-") or p.endswith(SUMMARY_NAME)]
    if stale:
        fs.rm(stale)


def write_predictions(tables: Iterable[Any], writer: PartWriter) -> tuple[manifest_io.TaskReport, dict[str, int]]:
    """Write the good rows of each prediction table; skips counted by kind with their key, as preprocess counts them."""
    import pyarrow.compute as pc

    report = manifest_io.TaskReport()
    buckets: dict[str, int] = {}
    for table in tables:
        bad = pc.not_equal(table.column(SKIP_KIND), "")
        skipped = table.filter(bad)
        for key, kind in zip(skipped.column("key").to_pylist(), skipped.column(SKIP_KIND).to_pylist(), strict=True):
            report.skip(kind, key)
        good = table.filter(pc.invert(bad)).drop_columns([SKIP_KIND, SKIP_DETAIL])
        report.read += good.num_rows
        report.kept += good.num_rows
        for name in good.column("bucket").to_pylist():
            buckets[name] = buckets.get(name, 0) + 1
        writer.write(good)
    writer.close()
    return report, buckets


def run_inference(cfg: InferConfig) -> dict[str, Any]:
    """Run ``cfg.checkpoint`` over ``cfg.input`` and write ``cfg.out``; returns (and writes) the summary.

    Raises FileNotFoundError naming a missing checkpoint or input, ConfigError for what cannot
    be produced (zero-shot without classes, captions without a decoder, ...).
    """
    start = time.perf_counter()
    with local_checkpoint(cfg.checkpoint, cfg.storage_options) as local:
        directory, model_cfg, run_cfg = _checkpoint(local)
        heads = check_model(cfg, directory, model_cfg, run_cfg)
    checkpoint = cfg.checkpoint if "://" in cfg.checkpoint else str(directory)
    source = open_input(cfg, run_cfg)
    spec = predictor_spec(cfg, checkpoint, heads, source)
    ds = predictions(source, spec, cfg.num_actors)
    out = absolute(cfg.out.rstrip("/"))
    writer = PartWriter(out, cfg.storage_options, cfg.rows_per_file)
    _clear(writer.fs, writer.base)
    log.info("infer %s over %s (%s) -> %s", checkpoint, cfg.input, ",".join(spec.what), out)
    report, buckets = write_predictions(ds.iter_batches(batch_size=None, batch_format="pyarrow"), writer)
    seconds = time.perf_counter() - start
    summary = manifest_io.build(report, source.skipped_files, {}, extra={
        "buckets": [{"name": name, "count": n} for name, n in sorted(buckets.items())],  # input buckets of the rows
        "rows_written": report.kept,
        "checkpoint": checkpoint,
        "input": cfg.input,
        "input_kind": source.kind,
        "shards": source.shards,
        "output": out,
        "files": writer.files,
        "what": list(spec.what),
        "classes": list(source.card.classes) if source.card.classes else None,
        "heads": spec.heads,
        "seed": cfg.seed,
        "timing": {"seconds": round(seconds, 3), "samples_per_s": round(report.read / seconds, 2)},
    })
    manifest_io.write(summary, join(out, SUMMARY_NAME), cfg.storage_options)
    return summary


def infer_config(checkpoint: str, input: str, out: str, what: str | None = None, pipeline: str | None = None,
                 overrides: list[str] | None = None, **options: Any) -> InferConfig:
    """The command line's values as an ``InferConfig`` (``what`` comma-separated); bad values name the flag."""
    data: dict[str, Any] = {"checkpoint": checkpoint, "input": input, "out": out, "pipeline": pipeline,
                            "pipeline_overrides": list(overrides or []),
                            **{k: v for k, v in options.items() if v is not None}}
    if what is not None:
        data["what"] = [w.strip() for w in what.split(",") if w.strip()]
    return validate(InferConfig, data, source="infer options")


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the end of a run: rows written, skips by kind, where the files are."""
    lines = [f"rows written: {summary['rows_written']} of {summary['total_read']} read"]
    lines += [f"skipped: {kind}: {n}" for kind, n in summary["skipped"].items()]
    lines.append(f"output: {summary['output']} ({len(summary['files'])} parquet file(s), {SUMMARY_NAME})")
    return "\n".join(lines)
