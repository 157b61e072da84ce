"""The Ray Data graph: list shards -> read tar shards (raw bytes) -> decode actors -> bucketed parquet.

One streaming pass. The reader (``tars``) marks a broken shard or sample instead of raising;
decode actors turn each raw sample into its processed rows (one per bucket it goes to) or a skip
record (never an exception; a key another shard already kept becomes ``duplicate_key`` through
``tars.KeyRegistry``),
packed into one fixed schema so rows of different buckets can share a block;
the datasink unpacks each bucket into uniform tensor columns under
``OUTPUT/bucket=<name>/`` and returns per-task counts that the driver merges into
``manifest.json``. Nothing is materialized, so memory does not grow with the input.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imp_platform.config import ConfigError
from imp_platform.config.pipeline import DecodeConfig, PipelineConfig, load_pipeline
from imp_platform.data import manifest as manifest_io
from imp_platform.data import modalities, resume, tars
from imp_platform.data.buckets import tokens_per_sample
from imp_platform.data.captions import CAPTION_COLUMNS
from imp_platform.data.decode import DecodedSample, DecodeError, decode_sample, load_tokenizer, time_limit
from imp_platform.data.sources import ShardListing, absolute, filesystem, join, list_shards
from imp_platform.data.tars import RawSample

log = logging.getLogger(__name__)

# Columns of the packed decode output shared by every row (tensors travel as raw bytes). ``view``:
# the row's index among its sample's rows (one per video resolution), so the sink counts samples.
SCALAR_COLUMNS = ("key", "bucket", "skip_kind", "label", "caption", "meta", "layout", "view")
# Logical CPUs per read / write task: the decode actors (1 CPU each) do the heavy work.
IO_TASK_CPUS = 0.25
BUCKET_DIR = "bucket={}"
# Rows per parquet row group (and the least rows per write task): the unit the stream reshuffles.
ROW_GROUP_ROWS = 128
TOKENIZER_NAME = "tokenizer.json"


def tensor_columns() -> tuple[str, ...]:
    """Every processed tensor column: the registry's modality columns, then the extra captions."""
    return (*modalities.tensor_columns(), *CAPTION_COLUMNS)


@dataclass(frozen=True)
class Skipped:
    """A sample that was not kept: its key, the fault kind (manifest counter) and why."""

    key: str
    kind: str
    detail: str


def resolve_tokenizer(cfg: PipelineConfig, shards: list[str]) -> str | None:
    """The tokenizer as JSON text (shipped to every decode task), or None when text is not enabled.

    ``text.tokenizer`` None means ``tokenizer.json`` beside the shards or one folder up
    (where ``platform data synth`` writes it); not finding one fails at once.
    """
    if "text" not in cfg.modalities.enabled:
        return None
    so = cfg.source.storage_options
    if cfg.text.tokenizer:
        candidates = [cfg.text.tokenizer]
    else:
        folder = shards[0].rsplit("/", 1)[0]
        candidates = [join(folder, "tokenizer.json"), join(folder.rsplit("/", 1)[0], "tokenizer.json")]
    for url in candidates:
        fs, path = filesystem(url, so)
        if fs.exists(path):
            return fs.cat_file(path).decode("utf-8")
    raise ConfigError(f"text is enabled but no tokenizer was found (looked at {candidates}); set text.tokenizer")


def dataset_card(cfg: PipelineConfig) -> dict[str, Any]:
    """The manifest's ``dataset`` entry: class names (index = label id; None when none are declared) and prompts."""
    return {"classes": cfg.dataset.class_names(), "prompts": list(cfg.dataset.prompts)}


def write_tokenizer(cfg: PipelineConfig, out: str, tokenizer_json: str | None) -> None:
    """Copy the resolved tokenizer to ``OUT/tokenizer.json`` so a processed split is self-contained (no-op without text)."""
    if tokenizer_json is None:
        return
    fs, base = filesystem(out, cfg.output.storage_options)
    fs.makedirs(base, exist_ok=True)
    fs.pipe_file(join(base, TOKENIZER_NAME), tokenizer_json.encode("utf-8"))


def decode_or_skip(sample: RawSample, cfg: PipelineConfig, tokenizer: Any) -> list[DecodedSample] | Skipped:
    """Decode one raw sample (its rows, one per bucket) within ``limits.sample_timeout_s``; one the
    reader marked faulty, or any failure, becomes a ``Skipped`` record."""
    key = sample.key
    if sample.skip:
        return Skipped(key, sample.skip, sample.detail)
    try:
        with time_limit(cfg.limits.sample_timeout_s):
            return decode_sample({"__key__": key, **sample.members}, cfg, tokenizer)
    except DecodeError as exc:
        return Skipped(key, exc.kind, exc.message)
    except Exception as exc:  # a decoder library failing in a way decode.py does not type yet
        log.warning("unexpected %s decoding %s: %s", type(exc).__name__, key, exc)
        return Skipped(key, "decode_error", f"{type(exc).__name__}: {exc}")


def raw_samples(batch: dict[str, np.ndarray]) -> Iterable[tuple[str, RawSample]]:
    """(shard URL, sample) of a raw batch (rows of ``tars.sample_blocks``; members absent from a row left out)."""
    members = [c for c in batch if not c.startswith("__")]
    for i, key in enumerate(batch[tars.KEY]):
        present = {ext: bytes(batch[ext][i]) for ext in members if isinstance(batch[ext][i], (bytes, bytearray))}
        yield str(batch[tars.URL][i]), RawSample(str(key), present, str(batch[tars.SKIP][i]), str(batch[tars.DETAIL][i]))


def drop_cross_shard_duplicates(
    results: list[tuple[str, list[DecodedSample] | Skipped]], registry: Any
) -> list[list[DecodedSample] | Skipped]:
    """Kept samples whose key another shard already kept become ``duplicate_key`` skips (one registry call per batch)."""
    import ray

    kept = [(r[0].key, url) for url, r in results if not isinstance(r, Skipped)]
    owners = iter(ray.get(registry.claim.remote(kept)) if kept else [])
    out: list[list[DecodedSample] | Skipped] = []
    for url, r in results:
        owner = None if isinstance(r, Skipped) else next(owners)
        out.append(r if owner is None else Skipped(r[0].key, tars.DUPLICATE_KEY, f"{r[0].key!r} in {url} was already kept from {owner}"))
    return out


def _arrays(sample: DecodedSample) -> dict[str, np.ndarray]:
    return {c: sample.row[c] for c in tensor_columns() if c in sample.row}


def _rows(results: list[list[DecodedSample] | Skipped]) -> Iterable[tuple[int, DecodedSample | Skipped]]:
    """(view, row) of every sample's rows in order; a skipped sample is one row, view 0."""
    for r in results:
        yield from [(0, r)] if isinstance(r, Skipped) else enumerate(r)


def _pack(results: list[list[DecodedSample] | Skipped], shards: list[str] | None = None) -> dict[str, np.ndarray]:
    """One fixed schema for kept and skipped rows of any bucket (tensors as raw bytes + layout);
    ``shard``: each row's shard URL (the sink writes and counts per shard)."""
    columns = tensor_columns()
    out: dict[str, list[Any]] = {c: [] for c in (*SCALAR_COLUMNS, *columns)}
    for view, r in _rows(results):
        kept = isinstance(r, DecodedSample)
        out["view"].append(view)
        arrays = _arrays(r) if kept else {}
        out["key"].append(r.key)
        out["bucket"].append(r.bucket if kept else "")
        out["skip_kind"].append("" if kept else r.kind)
        out["label"].append(int(r.row["label"]) if kept else -1)
        out["caption"].append(r.row["caption"] if kept else r.detail)
        out["meta"].append(r.row["meta"] if kept else "{}")
        out["layout"].append(json.dumps({c: [str(a.dtype), list(a.shape)] for c, a in arrays.items()}))
        for c in columns:
            out[c].append(np.ascontiguousarray(arrays[c]).tobytes() if c in arrays else b"")
    packed = {c: np.array(v, dtype=object) for c, v in out.items()}
    packed["label"] = np.asarray(out["label"], dtype=np.int64)
    packed["view"] = np.asarray(out["view"], dtype=np.int64)
    urls = shards or [""] * len(results)
    packed["shard"] = np.array([url for url, r in zip(urls, results, strict=True) for _ in _rows([r])], dtype=object)
    return packed


def bucket_layouts(cfg: PipelineConfig) -> dict[str, dict[str, tuple[str, list[int]]]]:
    """Every bucket the config can produce: name -> {tensor column: (dtype, shape)}.

    Lets the streaming path refuse an unknown bucket at once and emit correctly shaped
    empty batches; optional modalities may be absent, which makes a bucket of its own.
    """
    import itertools

    from imp_platform.data.buckets import bucket_name

    choices: list[list[dict[str, tuple[str, list[int]]]]] = []
    for source in modalities.SOURCES.values():  # each enabled source's column options (registry layouts)
        options = source.layouts(cfg, source.name) if source.name in cfg.modalities.enabled else []
        if options:
            choices.append(options + ([] if source.name in cfg.modalities.required else [{}]))
    layouts: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for combo in itertools.product(*choices):
        layout = {c: spec for part in combo for c, spec in part.items()}
        if layout:
            layouts[bucket_name({c: shape for c, (_, shape) in layout.items() if c in modalities.token_columns()})] = layout
    return layouts


def stack_rows(rows: list[DecodedSample], layout: dict[str, tuple[str, list[int]]], with_caption: bool) -> dict[str, np.ndarray]:
    """Rows of one bucket as uniform columns (the processed-row layout of the data contract)."""
    batch: dict[str, np.ndarray] = {
        "key": np.array([r.key for r in rows], dtype=object),
        "label": np.array([r.row["label"] for r in rows], dtype=np.int64),
        "meta": np.array([r.row["meta"] for r in rows], dtype=object),
    }
    if with_caption:
        batch["caption"] = np.array([r.row["caption"] for r in rows], dtype=object)
    for column, (dtype, shape) in layout.items():
        batch[column] = np.stack([r.row[column] for r in rows]) if rows else np.zeros((0, *shape), dtype=dtype)
    return batch


class DecodeBatches:
    """The decode step: raw webdataset batch -> packed rows (preprocess) or one bucket's rows (streaming).

    Built once per decode actor, so the tokenizer loads once; decode.py
    reads headers first and decodes only the sampled frames. A bad sample becomes a skip
    record with its key and fault kind.
    """

    def __init__(self, cfg: PipelineConfig, tokenizer_json: str | None, keep_bucket: str | None = None,
                 registry: Any = None) -> None:
        import torch

        torch.set_num_threads(max(1, cfg.decode.num_threads))  # one process per core, not cores^2 threads
        self.cfg, self.keep_bucket, self.registry = cfg, keep_bucket, registry
        self.layout = bucket_layouts(cfg)[keep_bucket] if keep_bucket else {}
        self.tokenizer = load_tokenizer(tokenizer_json) if tokenizer_json else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = [(url, decode_or_skip(sample, self.cfg, self.tokenizer)) for url, sample in raw_samples(batch)]
        results = drop_cross_shard_duplicates(decoded, self.registry) if self.registry else [r for _, r in decoded]
        if self.keep_bucket is None:
            return _pack(results, [url for url, _ in decoded])
        for r in results:
            if isinstance(r, Skipped):
                log.warning("skipped %s: %s (%s)", r.key, r.kind, r.detail)
        kept = [r for _, r in _rows(results) if isinstance(r, DecodedSample) and r.bucket == self.keep_bucket]
        return stack_rows(kept, self.layout, with_caption="text" in self.cfg.modalities.enabled)


def _bucket_table(rows: Any, layout: dict[str, list[Any]], with_caption: bool) -> Any:
    """Packed rows of one bucket -> an Arrow table with Ray tensor columns (uniform shapes)."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    n = rows.num_rows
    columns: dict[str, Any] = {
        "key": rows.column("key"),
        "label": rows.column("label"),
        "meta": rows.column("meta"),
    }
    if with_caption:
        columns["caption"] = rows.column("caption")
    for name, (dtype, shape) in layout.items():
        raw = b"".join(rows.column(name).to_pylist())
        columns[name] = ArrowTensorArray.from_numpy(np.frombuffer(raw, dtype=dtype).reshape(n, *shape))
    return pa.table(columns)


def _column_spec(table: Any, layout: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    """Per-column dtype and shape ([] for scalars) recorded in the manifest for readers."""
    import pyarrow as pa

    spec: dict[str, dict[str, Any]] = {}
    for field in table.schema:
        if field.name in layout:
            spec[field.name] = {"dtype": layout[field.name][0], "shape": list(layout[field.name][1])}
        else:
            is_text = pa.types.is_string(field.type) or pa.types.is_large_string(field.type)
            spec[field.name] = {"dtype": "str" if is_text else str(field.type), "shape": []}
    return spec


def _account(rows: Any, progress: resume.ShardProgress, with_caption: bool) -> Iterable[tuple[str, Any]]:
    """Count one shard's packed rows into ``progress`` (end marker, skips, kept samples) and yield each
    bucket's kept rows as an Arrow table to write."""
    import pyarrow.compute as pc

    kinds = rows.column("skip_kind")
    for count in rows.filter(pc.equal(kinds, tars.END_OF_SHARD)).column("caption").to_pylist():
        progress.total = int(count)
    skipped = rows.filter(pc.and_(pc.not_equal(kinds, ""), pc.not_equal(kinds, tars.END_OF_SHARD)))
    for key, kind in zip(skipped.column("key").to_pylist(), skipped.column("skip_kind").to_pylist(), strict=True):
        progress.report.skip(kind, key)
    kept = rows.filter(pc.equal(kinds, ""))
    for bucket in sorted(set(kept.column("bucket").to_pylist())):
        mine = kept.filter(pc.equal(kept.column("bucket"), bucket))
        layout = json.loads(mine.column("layout")[0].as_py())
        out = _bucket_table(mine, layout, with_caption)
        part = progress.report.buckets.setdefault(bucket, manifest_io.BucketPart(columns=_column_spec(out, layout)))
        part.count += out.num_rows
        samples = pc.sum(pc.equal(mine.column("view"), 0)).as_py() or 0  # a sample's first row
        progress.report.read += samples
        progress.report.kept += samples
        yield bucket, out


def _make_sink(root: str, storage_options: dict[str, Any], with_caption: bool, progress_dir: str) -> Any:
    from ray.data import Datasink

    class BucketParquetSink(Datasink):
        """Writes each bucket's rows of each shard to ``ROOT/bucket=<name>/part-<run>-<task>-<shard>.parquet``
        and the task's per-shard progress to ``progress_dir`` (see data/resume.py); returns a TaskReport."""

        def __init__(self) -> None:
            self.report = manifest_io.TaskReport()
            self.run = uuid.uuid4().hex[:8]

        def get_name(self) -> str:
            return "WriteBuckets"

        @property
        def min_rows_per_write(self) -> int:
            return ROW_GROUP_ROWS

        def write(self, blocks: Iterable[Any], ctx: Any) -> manifest_io.TaskReport:
            import pyarrow as pa
            import pyarrow.compute as pc
            import pyarrow.parquet as pq
            from ray.data.block import BlockAccessor

            fs, base = filesystem(root, storage_options)
            shards: dict[str, resume.ShardProgress] = {}
            writers: dict[tuple[str, str], tuple[Any, Any]] = {}
            pending: dict[tuple[str, str], list[Any]] = {}

            def flush(bucket: str, shard: str) -> None:
                """Write a (bucket, shard)'s buffered rows as one row group (one file per bucket, shard and task)."""
                table = pa.concat_tables(pending.pop((bucket, shard)))
                part = shards[shard].report.buckets[bucket]
                if (bucket, shard) not in writers:
                    rel = f"{BUCKET_DIR.format(bucket)}/part-{self.run}-{ctx.task_idx:05d}-{resume.shard_id(shard)}.parquet"
                    fs.makedirs(join(base, BUCKET_DIR.format(bucket)), exist_ok=True)
                    handle = fs.open(join(base, rel), "wb")
                    writers[(bucket, shard)] = (pq.ParquetWriter(handle, table.schema), handle)
                    part.files.append({"path": rel, "row_groups": []})
                writers[(bucket, shard)][0].write_table(table, row_group_size=table.num_rows)
                part.files[-1]["row_groups"].append(table.num_rows)

            try:
                for block in blocks:
                    table = BlockAccessor.for_block(block).to_arrow()
                    for shard in pc.unique(table.column("shard")).to_pylist():
                        progress = shards.setdefault(shard, resume.ShardProgress())
                        rows = table.filter(pc.equal(table.column("shard"), shard))
                        for bucket, out in _account(rows, progress, with_caption):
                            buffered = pending.setdefault((bucket, shard), [])
                            buffered.append(out)
                            if sum(t.num_rows for t in buffered) >= ROW_GROUP_ROWS:
                                flush(bucket, shard)
                for key in list(pending):
                    flush(*key)
            finally:
                for writer, handle in writers.values():
                    writer.close()
                    handle.close()
            resume.write_record(progress_dir, f"{self.run}-{ctx.task_idx:05d}", shards, storage_options)
            report = manifest_io.TaskReport()
            for progress in shards.values():
                report.merge(progress.report)
            return report

        def on_write_complete(self, write_result: Any) -> None:
            for task_report in write_result.write_returns:
                self.report.merge(task_report)

    return BucketParquetSink()


def _decode_cpus(cfg: PipelineConfig) -> float:
    """Logical CPUs per decode task: one, unless the cluster is too small to also fit the I/O tasks.

    A 2-CPU ``ray.init()`` with two 1-CPU decode actors would leave nothing for the read task and
    the pipeline would stall without an error (REFERENCE: Ray 2.60 facts).
    """
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    return min(1.0, max(0.1, (total - 2 * IO_TASK_CPUS) / cfg.decode.num_actors))


def _limit_resources(ds: Any, cfg: PipelineConfig, decode_cpus: float, compute: str) -> None:
    """Cap what this dataset may use so it runs on 2 cores beside training (REFERENCE: Ray 2.60).

    Decode tasks are capped by their concurrency instead of a CPU budget: under a budget Ray Data's
    reservation allocator runs one decode task at a time (measured: a 1024-sample preprocess used
    one core of two). The object-store cap holds either way, so memory stays flat.
    """
    from ray.data import ExecutionResources

    cpus = cfg.decode.num_actors * decode_cpus + 2 * IO_TASK_CPUS if compute == "actors" else None
    store = cfg.decode.object_store_mb
    ds.context.execution_options.resource_limits = ExecutionResources(
        cpu=cpus, object_store_memory=None if store is None else store * 2**20)


def _one_filesystem(urls: list[str], storage_options: dict[str, Any]) -> tuple[Any, list[str]]:
    protocols = {filesystem(u, storage_options)[0].protocol for u in urls}
    if len(protocols) > 1:
        raise ConfigError(f"source.paths mix filesystems {sorted(map(str, protocols))}; use one per pipeline")
    fs = filesystem(urls[0], storage_options)[0]
    return fs, [filesystem(u, storage_options)[1] for u in urls]


def decoded_dataset(cfg: PipelineConfig, keep_bucket: str | None = None) -> tuple[Any, ShardListing]:
    """The lazy read -> decode graph (packed rows, or one bucket's uniform rows) and the shard listing."""
    if keep_bucket is not None and keep_bucket not in bucket_layouts(cfg):
        raise ConfigError(f"no bucket {keep_bucket!r} in pipeline {cfg.name}; it has {sorted(bucket_layouts(cfg))}")
    listing = list_shards(cfg.source.paths, cfg.source.storage_options)
    graph = _decode_graph(cfg, listing.shards, resolve_tokenizer(cfg, listing.shards), listing.raw_bytes, keep_bucket)
    return graph, listing


def decode_compute(decode: DecodeConfig, raw_bytes: int) -> str:
    """``tasks`` or ``actors``: ``decode.compute``, with ``auto`` picking by the raw input's size."""
    if decode.compute != "auto":
        return decode.compute
    return "actors" if raw_bytes >= decode.actors_from_mb * 2**20 else "tasks"


def _decode_graph(cfg: PipelineConfig, shards: list[str], tokenizer_json: str | None, raw_bytes: int,
                  keep_bucket: str | None = None, claims: list[tuple[str, str]] | None = None,
                  end_markers: bool = False) -> Any:
    """Read -> decode over ``shards`` (``raw_bytes`` in all). ``claims``: (key, shard) kept by shards a
    resumed preprocess does not read again; ``end_markers``: an ``END_OF_SHARD`` row after each shard's samples."""
    import ray
    import ray.data

    fs, paths = _one_filesystem(shards, cfg.source.storage_options)
    # One read task per shard, its blocks not split further: Ray's default targets 200 blocks and
    # would cut each small shard into a few rows per block, which costs more than it spreads.
    max_member = int(cfg.limits.max_member_mb * 2**20)
    source = tars.datasource(paths, fs, max_member, end_markers)
    ds = ray.data.read_datasource(source, num_cpus=IO_TASK_CPUS, override_num_blocks=len(paths))
    if not ray.is_initialized():
        ray.init()
    decode_cpus = _decode_cpus(cfg)
    compute = decode_compute(cfg.decode, raw_bytes)
    _limit_resources(ds, cfg, decode_cpus, compute)
    # Cross-shard duplicate keys are judged in a one-pass preprocess only: a bucket stream is
    # re-executed every epoch and would find each key already kept.
    registry = ray.remote(num_cpus=0)(tars.KeyRegistry).remote() if keep_bucket is None else None
    if registry is not None and claims:
        ray.get(registry.claim.remote(claims))
    decoder = (cfg, tokenizer_json, keep_bucket, registry)
    return map_decode(ds, decoder, cfg.decode, decode_cpus, compute)


def decode_batch(batch: dict[str, np.ndarray], decoder: tuple[Any, ...]) -> dict[str, np.ndarray]:
    """The decode step as a plain task: ``DecodeBatches`` built per batch (the tokenizer and the
    decoders' imports are cached per worker process, so this costs microseconds)."""
    return DecodeBatches(*decoder)(batch)


def map_decode(ds: Any, decoder: tuple[Any, ...], decode: DecodeConfig, cpus: float, compute: str) -> Any:
    """The decode stage: ``decode.num_actors`` concurrent Ray tasks (``compute`` tasks) or actors.

    Tasks run on Ray's pooled workers, which keep their imports from one run to the next; each
    actor is a new process that imports torch, torchaudio and decord (~5-10 s on 2 busy cores)
    before its first sample, but the pool then decodes faster. Measured paired on the loaded
    2-core machine (README, "Ingest speed"): a 42-sample preprocess 7.5-9.9 s with tasks against
    15.7-27.8 s with actors; 256 samples 3.6 s against 13.4 s; at 1024 samples the two were even;
    at 4096 (``platform bench data``) tasks decoded 74 samples/s in steady state against the
    pool's 138 (an earlier quiet run), hence ``auto``.
    """
    if compute == "tasks":
        return ds.map_batches(decode_batch, fn_args=(decoder,), batch_size=decode.batch_size,
                              batch_format="numpy", concurrency=decode.num_actors, num_cpus=cpus)
    from ray.data import ActorPoolStrategy

    return ds.map_batches(DecodeBatches, fn_constructor_args=decoder,
                          batch_size=decode.batch_size, batch_format="numpy",
                          compute=ActorPoolStrategy(size=decode.num_actors), num_cpus=cpus)


def _clear_output(root: str, storage_options: dict[str, Any], committed: dict[str, Any]) -> None:
    """Once ``committed`` is the manifest, delete what it does not name: an earlier run's bucket files
    (and bucket folders left empty), a killed run's partial files, unrenamed temporary manifests.

    Runs only after the commit, so a failure anywhere before leaves the previous output whole.
    """
    fs, base = filesystem(root, storage_options)
    fs.invalidate_cache(base)  # s3fs caches listings: this process may have listed here before the run
    listed = {join(base, f["path"]) for bucket in committed["buckets"] for f in bucket["files"]}
    for entry in fs.ls(base, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(manifest_io.MANIFEST_NAME + manifest_io.TMP_SUFFIX):
            fs.rm(entry)
        elif name.startswith(BUCKET_DIR.format("")):
            files = fs.find(entry)
            stale = [path for path in files if path not in listed]
            if len(stale) == len(files):
                fs.rm(entry, recursive=True)
            elif stale:
                fs.rm(stale)
        elif name == resume.RESUME_DIR:  # the killed runs' progress: the manifest holds what it said
            fs.rm(entry, recursive=True)


@contextmanager
def ray_for_preprocess() -> Iterator[None]:
    """The running Ray (a job's, a test's, training's), else a local one for this run only.

    The local one starts without the dashboard: a preprocess needs neither its UI nor the State
    API (Ray Train's placement-group cleaner does, hence ``trainer.ensure_ray`` keeps it), and it
    costs seconds of start-up. It stops afterwards, so a Ray Train run later in the same process
    starts its own, with the dashboard.
    """
    import ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        yield
        return
    ray.init(address="local", include_dashboard=False)  # never another process's Ray (as ensure_ray)
    try:
        yield
    finally:
        ray.shutdown()


def preprocess(cfg: PipelineConfig) -> dict[str, Any]:
    """Decode, bucket and write one source to ``cfg.output.path``; returns (and writes) the manifest.

    Raises FileNotFoundError naming the path when the source does not exist; every bad
    sample or unusable file is skipped and counted by kind with its key.

    A previous output stays readable until this run has finished: new parquet files get names
    of their own (the sink's run id) beside the old ones, readers use only the files the manifest
    names, and the manifest is replaced atomically at the end (the commit point); only then are
    the previous run's files deleted. A run killed half way leaves the old dataset whole (plus
    unnamed files the next completed run removes). Rerun with the same settings, it skips the
    shards the killed run wrote in full and keeps their files (data/resume.py).
    """
    start = time.perf_counter()
    listing = list_shards(cfg.source.paths, cfg.source.storage_options)
    tokenizer_json = resolve_tokenizer(cfg, listing.shards)
    out = absolute(cfg.output.path.rstrip("/"))
    out_fs, out_path = filesystem(out, cfg.output.storage_options)
    out_fs.makedirs(out_path, exist_ok=True)
    progress_dir = join(out, resume.RESUME_DIR, resume.fingerprint(cfg, tokenizer_json))
    done = resume.done_shards(out, progress_dir, listing.shards, cfg.output.storage_options)
    todo = [shard for shard in listing.shards if shard not in done]
    log.info("preprocess %s: %d shards (%d done by a killed run) -> %s", cfg.name, len(listing.shards), len(done), out)
    fresh, stats = manifest_io.TaskReport(), f"all {len(done)} shards resumed"
    if todo:
        claims = [(key, url) for url, shard in done.items() for key in shard.keys]
        with ray_for_preprocess():
            ds = _decode_graph(cfg, todo, tokenizer_json, listing.raw_bytes, claims=claims, end_markers=True)
            sink = _make_sink(out, cfg.output.storage_options, "text" in cfg.modalities.enabled, progress_dir)
            ds.write_datasink(sink, ray_remote_args={"num_cpus": IO_TASK_CPUS})
            fresh, stats = sink.report, ds.stats()
    seconds = time.perf_counter() - start
    report = manifest_io.TaskReport()
    for part in [*(shard.report for shard in done.values()), fresh]:
        report.merge(part)
    tokens = {
        name: tokens_per_sample(manifest_io.shapes(part.columns), cfg.patches) for name, part in report.buckets.items()
    }
    result = manifest_io.build(
        report,
        listing.skipped,
        tokens,
        extra={
            "name": cfg.name,
            "source": list(cfg.source.paths),
            "output": out,
            "shards": len(listing.shards),
            "raw_bytes": listing.raw_bytes,
            "dataset": dataset_card(cfg),
            "resumed_shards": len(done),
            "timing": {"seconds": round(seconds, 3), "samples_per_s": round(fresh.read / seconds, 2)},
            "stats": stats,
        },
    )
    write_tokenizer(cfg, out, tokenizer_json)  # before the manifest, the commit point
    manifest_io.write(result, join(out, manifest_io.MANIFEST_NAME), cfg.output.storage_options)
    _clear_output(out, cfg.output.storage_options, result)
    return result


def load_preprocess_config(
    path: str | Path | None,
    input_path: str | None = None,
    output_path: str | None = None,
    overrides: list[str] | None = None,
) -> PipelineConfig:
    """Pipeline YAML + ``--set`` overrides, then ``--input``/``--output`` replace source and output paths."""
    cfg = load_pipeline(path, overrides)
    if input_path:
        cfg.source.paths = [str(input_path)]
    if output_path:
        cfg.output.path = str(output_path)
    return cfg
