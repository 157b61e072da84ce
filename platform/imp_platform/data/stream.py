"""Bucketed data handed to training: resumable per-bucket streams, eval passes, Ray Datasets.

Ray Data has no checkpointable iterator (ray #37633, #48224), so the training stream reads
the preprocessed parquet itself (pyarrow + fsspec) and owns its sample order: every epoch a
seeded permutation of the bucket's row groups is cut into ``world_size`` contiguous, disjoint
slices; each rank shuffles its slice window by window. The position is two integers
(epoch, rows consumed), so ``state_dict()`` saved in a training checkpoint resumes exactly;
``resume()`` takes every rank's saved state, so a run resumed on another number of workers
finishes the interrupted epoch with the rows nobody read yet (none twice) and then follows
the new world size's plan.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imp_platform.data import manifest as manifest_io
from imp_platform.data import modalities as registry
from imp_platform.data.buckets import bucket_name
from imp_platform.data.captions import CAPTION_COLUMNS, draw_captions, with_caption_columns
from imp_platform.data.sources import filesystem, join

if TYPE_CHECKING:
    import ray.data

    from imp_platform.config.pipeline import PipelineConfig

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
STATE_VERSION = 2  # 2: ``carry`` (an epoch finished for a run of another world size)
CAPTION_DRAW = 1  # stream of the per-step caption draw, apart from the row order's


@dataclass(frozen=True)
class BucketInfo:
    """One bucket of a processed dataset, or a view of several: every row has the same shapes in ``columns``."""

    name: str
    count: int
    shape: dict[str, list[int]]
    files: list[str]
    columns: dict[str, dict[str, Any]]
    # (file index, row-group index, rows) for every row group, in manifest order.
    row_groups: tuple[tuple[int, int, int], ...]

    @classmethod
    def from_manifest(cls, root: str, entry: dict[str, Any]) -> BucketInfo:
        files = [join(root, f["path"]) for f in entry["files"]]
        groups = tuple(
            (fi, gi, int(rows)) for fi, f in enumerate(entry["files"]) for gi, rows in enumerate(f["row_groups"]) if rows
        )
        return cls(
            name=entry["name"],
            count=int(entry["count"]),
            shape={k: list(v) for k, v in entry["shape"].items()},
            files=files,
            columns=entry["columns"],
            row_groups=groups,
        )

    @classmethod
    def merge(cls, parts: Sequence[BucketInfo], columns: Sequence[str]) -> BucketInfo:
        """One view of ``parts``, which agree on the shapes of ``columns`` (and may differ elsewhere).

        Named after those shapes (``bucket_name``); only ``columns`` can be read from it.
        """
        first = parts[0]
        specs = {c: first.columns[c] for c in columns}
        for part in parts[1:]:
            if any(part.columns[c] != spec for c, spec in specs.items()):
                raise ValueError(f"buckets {first.name} and {part.name} disagree on columns {list(columns)}")
        shape = {c: first.shape[c] for c in columns if c in first.shape}
        files: list[str] = []
        groups: list[tuple[int, int, int]] = []
        for part in parts:
            groups.extend((len(files) + fi, gi, rows) for fi, gi, rows in part.row_groups)
            files.extend(part.files)
        return cls(
            name=bucket_name({c: s for c, s in shape.items() if c in registry.token_columns()}),
            count=sum(p.count for p in parts),
            shape=shape,
            files=files,
            columns=specs,
            row_groups=tuple(groups),
        )


_NUMPY_TYPES = {
    pa.from_numpy_dtype(np.dtype(name)): np.dtype(name)
    for name in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64")
}


def _primitive_to_numpy(array: pa.Array) -> np.ndarray:
    """A null-free fixed-width Arrow array as numpy, without Arrow's pandas-importing path."""
    if pa.types.is_boolean(array.type):
        return _primitive_to_numpy(array.cast(pa.uint8())).astype(bool)
    dtype = _NUMPY_TYPES[array.type]
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _column_to_numpy(column: pa.ChunkedArray, spec: dict[str, Any]) -> np.ndarray:
    """Arrow column -> numpy; tensor columns (Ray's list-backed tensor type) -> [n, *shape]."""
    array = column.combine_chunks()
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return np.array(array.to_pylist(), dtype=object)
    if not spec["shape"]:
        return _primitive_to_numpy(array)
    values = array.flatten()
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type):
        values = values.flatten()
    return _primitive_to_numpy(values).reshape(len(array), *spec["shape"])


class _RowGroupReader:
    """Reads (parts of) row groups of one bucket's files into numpy columns."""

    def __init__(self, fs: Any, info: BucketInfo, columns: Sequence[str]) -> None:
        self.fs, self.info, self.columns = fs, info, list(columns)
        self._files: dict[int, pq.ParquetFile] = {}

    def read(self, unit: int, start: int, stop: int) -> Batch:
        file_idx, group_idx, _ = self.info.row_groups[unit]
        if file_idx not in self._files:
            _, path = filesystem(self.info.files[file_idx])
            self._files[file_idx] = pq.ParquetFile(self.fs.open(path, "rb"))
        table = self._files[file_idx].read_row_group(group_idx, columns=self.columns).slice(start, stop - start)
        return {name: _column_to_numpy(table.column(name), self.info.columns[name]) for name in self.columns}

    def close(self) -> None:
        """Close the file handles (each holds a reader buffer; a long run opens many streams)."""
        for handle in self._files.values():
            handle.close(force=True)  # we opened the file object, so ParquetFile would not close it
        self._files = {}


def _concat(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _take(batch: Batch, index: np.ndarray | slice) -> Batch:
    return {name: values[index] for name, values in batch.items()}


@dataclass(frozen=True)
class _Window:
    """Row-group segments of one rank's epoch slice, read and shuffled together."""

    start: int  # offset of the window's first row in the rank's epoch sequence
    rows: int
    segments: tuple[tuple[int, int, int], ...]  # (unit, first row, end row)
    # Row order into the concatenated segments; None = the seeded shuffle. Set for the rows left
    # over from an epoch that other ranks began (a resume on another world size).
    order: tuple[int, ...] | None = None


def _epoch_windows(groups: tuple[tuple[int, int, int], ...], seed: int, epoch: int, rank: int, world_size: int,
                   shuffle_window: int) -> list[_Window]:
    """``rank``'s windows for ``epoch``: a seeded row-group order, cut into ``world_size`` contiguous slices."""
    order = np.random.default_rng([seed, epoch]).permutation(len(groups))
    sizes = np.array([groups[u][2] for u in order])
    ends = np.cumsum(sizes)
    total = int(ends[-1])
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    windows: list[_Window] = []
    segments: list[tuple[int, int, int]] = []
    start = rows = 0
    for unit, end, size in zip(order, ends, sizes, strict=True):
        first, last, base = max(lo, int(end - size)), min(hi, int(end)), int(end - size)
        if first >= last:
            continue
        segments.append((int(unit), first - base, last - base))
        rows += last - first
        if rows >= shuffle_window:
            windows.append(_Window(start, rows, tuple(segments)))
            start, rows, segments = start + rows, 0, []
    if segments:
        windows.append(_Window(start, rows, tuple(segments)))
    return windows


def _shuffle(seed: int, epoch: int, rank: int, index: int, rows: int) -> np.ndarray:
    """The seeded row order of one window (a pure function, so a cursor can be replayed without reading)."""
    return np.random.default_rng([seed, epoch, rank, index]).permutation(rows)


def _window_ids(window: _Window, order: Sequence[int] | np.ndarray) -> np.ndarray:
    """[rows, 2] (unit, row) ids of a window's rows in the order it yields them."""
    ids = np.concatenate([np.stack([np.full(b - a, unit), np.arange(a, b)], axis=1) for unit, a, b in window.segments])
    return ids[np.asarray(order)]


def _sequence(groups: tuple[tuple[int, int, int], ...], state: dict[str, Any]) -> np.ndarray:
    """Every (unit, row) id a saved rank yields in its saved epoch, in order (offset 0 to the end)."""
    if state.get("carry"):
        return _share(_leftover(groups, state["carry"])[1], state["rank"], state["world_size"])
    seed, epoch, rank = state["seed"], state["epoch"], state["rank"]
    windows = _epoch_windows(groups, seed, epoch, rank, state["world_size"], state["shuffle_window"])
    parts = [_window_ids(w, _shuffle(seed, epoch, rank, i, w.rows)) for i, w in enumerate(windows)]
    return np.concatenate(parts) if parts else np.zeros((0, 2), dtype=int)


def _leftover(groups: tuple[tuple[int, int, int], ...], states: Sequence[dict[str, Any]]) -> tuple[int, np.ndarray]:
    """(epoch, ids not yet yielded by any rank in it) from the saved states of every rank of one world.

    The epoch is the earliest any rank is in; a rank that already wrapped into the next one has
    nothing left in it (the few rows it read of the next epoch may come again there).
    """
    epoch = min(int(s["epoch"]) for s in states)
    parts = [_sequence(groups, s)[int(s["offset"]):] for s in sorted(states, key=lambda s: s["rank"])
             if int(s["epoch"]) == epoch]
    return epoch, np.concatenate(parts) if parts else np.zeros((0, 2), dtype=int)


def _share(ids: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """``rank``'s contiguous, disjoint share of ``ids``."""
    return ids[rank * len(ids) // world_size:(rank + 1) * len(ids) // world_size]


def _id_windows(ids: np.ndarray, shuffle_window: int) -> list[_Window]:
    """Windows that yield ``ids`` in order, each reading the row range it needs of each row group once."""
    windows: list[_Window] = []
    for start in range(0, len(ids), shuffle_window):
        chunk = ids[start:start + shuffle_window]
        segments, base, position = [], 0, {}
        for unit in dict.fromkeys(chunk[:, 0].tolist()):
            rows = chunk[chunk[:, 0] == unit, 1]
            first, last = int(rows.min()), int(rows.max()) + 1
            segments.append((unit, first, last))
            position[unit] = base - first
            base += last - first
        order = tuple(int(position[u] + r) for u, r in chunk.tolist())
        windows.append(_Window(start, len(chunk), tuple(segments), order))
    return windows


class BucketStream:
    """Endless, seeded, resumable batches of one bucket for one rank.

    Iterating yields ``dict[str, np.ndarray]`` batches of exactly ``batch_size`` rows; a batch
    may span an epoch boundary. The next window is read in a background thread.
    """

    def __init__(
        self,
        reader: _RowGroupReader,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle_window: int,
    ) -> None:
        info = reader.info
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if info.count < world_size:
            raise ValueError(f"bucket {info.name} has {info.count} rows, fewer than world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.reader, self.batch_size = reader, batch_size
        self.rank, self.world_size, self.seed, self.shuffle_window = rank, world_size, seed, shuffle_window
        self.epoch = 0
        self.offset = 0  # rows of this rank's epoch slice already yielded
        self._carry: list[dict[str, Any]] | None = None  # other ranks' states whose epoch this one finishes
        self._plans: dict[int, list[_Window]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stream-{info.name}")
        self._current: tuple[tuple[int, int], Batch] | None = None
        self._next: dict[tuple[int, int], Future[Batch]] = {}

    # -- position -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position to save in a checkpoint (plain ints/strings/lists, JSON-safe)."""
        return {
            "version": STATE_VERSION,
            "bucket": self.reader.info.name,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle_window": self.shuffle_window,
            "epoch": self.epoch,
            "offset": self.offset,
            "carry": self._carry,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position this rank saved at this world size; the order-defining settings must match."""
        self._check(state, ("version", "bucket", "seed", "rank", "world_size", "shuffle_window"))
        self._current, self._next, self._plans = None, {}, {}
        self.epoch, self.offset, self._carry = int(state["epoch"]), int(state["offset"]), None
        if state.get("carry"):
            self._finish_epoch_of(state["carry"], self.offset)

    def resume(self, states: Sequence[dict[str, Any]]) -> None:
        """Continue from the saved states of every rank of a run, at this or another world size.

        At the same world size this is ``load_state_dict`` of our own state. Otherwise the rows
        the old ranks had not yet read in their epoch are split among the new ranks (no row
        read twice within it) and the next epoch starts on the new world size's plan.
        """
        own = [s for s in states if (s["rank"], s["world_size"]) == (self.rank, self.world_size)]
        if own:
            self.load_state_dict(own[0])
            return
        for state in states:  # the window may differ: batch sizes depend on the world size
            self._check(state, ("version", "bucket", "seed"))
        worlds = {int(s["world_size"]) for s in states}
        if len(worlds) != 1 or sorted(int(s["rank"]) for s in states) != list(range(worlds.pop())):
            raise ValueError(f"stream {self.reader.info.name}: need the states of every rank of one run, got ranks "
                             f"{sorted((s['rank'], s['world_size']) for s in states)}")
        self._current, self._next, self._plans = None, {}, {}
        self.offset = 0
        self._finish_epoch_of(list(states), 0)

    def _check(self, state: dict[str, Any], keys: tuple[str, ...]) -> None:
        mine = self.state_dict()
        for key in keys:
            if state.get(key) != mine[key]:
                raise ValueError(f"stream state mismatch on {key!r}: saved {state.get(key)!r}, "
                                 f"this stream {mine[key]!r}")

    def _finish_epoch_of(self, carry: list[dict[str, Any]], offset: int) -> None:
        """Plan this rank's share of the rows ``carry``'s ranks left in their epoch, from ``offset`` on."""
        epoch, ids = _leftover(self.reader.info.row_groups, carry)
        mine = _share(ids, self.rank, self.world_size)
        self.epoch, self.offset = epoch, offset
        if offset >= len(mine):  # nothing of that epoch left for us
            self.epoch, self.offset, self._carry = epoch + 1, 0, None
            return
        self._carry = carry
        self._plans[epoch] = _id_windows(mine, self.shuffle_window)

    # -- plan ---------------------------------------------------------------------------
    def _plan(self, epoch: int) -> list[_Window]:
        """This rank's windows for ``epoch`` (a finished-for-others epoch is planned by ``_finish_epoch_of``)."""
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = _epoch_windows(self.reader.info.row_groups, self.seed, epoch, self.rank,
                                                self.world_size, self.shuffle_window)
        return self._plans[epoch]

    def _load(self, window: _Window, epoch: int, index: int) -> Batch:
        """Read a window's segments (in the prefetch thread) and put its rows in order, seeded."""
        parts = [self.reader.read(unit, a, b) for unit, a, b in window.segments]
        order = window.order if window.order is not None else _shuffle(self.seed, epoch, self.rank, index, window.rows)
        return _take(_concat(parts), np.asarray(order))

    def _window(self, epoch: int, index: int) -> Batch:
        """The ordered rows of one window, kept while in use; the next one loads meanwhile.

        Plans are made here, on the caller's thread; the pool thread only reads parquet.
        """
        key = (epoch, index)
        if self._current is None or self._current[0] != key:
            future = self._next.pop(key, None) or self._pool.submit(self._load, self._plan(epoch)[index], epoch, index)
            self._current = (key, future.result())
            following = (epoch, index + 1) if index + 1 < len(self._plan(epoch)) else (epoch + 1, 0)
            window = self._plan(following[0])[following[1]]
            self._next = {following: self._pool.submit(self._load, window, *following)}
        return self._current[1]

    # -- iteration ----------------------------------------------------------------------
    def __iter__(self) -> BucketStream:
        return self

    def __next__(self) -> Batch:
        draw = np.random.default_rng([self.seed, self.epoch, self.rank, self.offset, CAPTION_DRAW])
        parts: list[Batch] = []
        need = self.batch_size
        while need:
            plan = self._plan(self.epoch)
            index = next(i for i, w in enumerate(plan) if w.start + w.rows > self.offset)
            window = plan[index]
            data = self._window(self.epoch, index)
            first = self.offset - window.start
            take = min(need, window.rows - first)
            parts.append(_take(data, slice(first, first + take)))
            need -= take
            self.offset += take
            if self.offset >= plan[-1].start + plan[-1].rows:
                self.epoch, self.offset, self._carry = self.epoch + 1, 0, None
        batch = _concat(parts)
        return draw_captions(batch, draw) if all(c in batch for c in CAPTION_COLUMNS) and "text_ids" in batch else batch

    def close(self) -> None:
        """Stop the prefetch thread and close the open parquet files (a closed stream can be reopened from its state)."""
        self._pool.shutdown(wait=True, cancel_futures=True)  # a read in flight finishes before its file closes
        self._current, self._next = None, {}
        self.reader.close()


class ProcessedDataset:
    """A preprocessed, bucketed dataset (local folder or ``s3://``) described by its manifest."""

    def __init__(self, root: str, manifest: dict[str, Any], storage_options: dict[str, Any] | None) -> None:
        self.root, self.manifest, self.storage_options = root, manifest, storage_options or {}
        self.fs, _ = filesystem(root, self.storage_options)
        self.buckets: list[BucketInfo] = [BucketInfo.from_manifest(root, b) for b in manifest["buckets"]]

    @classmethod
    def open(cls, path: str, storage_options: dict[str, Any] | None = None) -> ProcessedDataset:
        root = str(path).rstrip("/")
        return cls(root, manifest_io.read(join(root, manifest_io.MANIFEST_NAME), storage_options), storage_options)

    def bucket(self, name: str | BucketInfo) -> BucketInfo:
        if isinstance(name, BucketInfo):
            return name
        for info in self.buckets:
            if info.name == name:
                return info
        raise KeyError(f"no bucket {name!r} in {self.root}; buckets: {[b.name for b in self.buckets]}")

    def views(self, columns: Sequence[str], buckets: Sequence[str] | None = None) -> list[BucketInfo]:
        """The buckets that hold ``columns`` (of those named in ``buckets``, if given), merged where
        those columns agree in shape and dtype.

        A task reads only its own columns, so buckets that differ only in others (the caption
        length, for a video classifier) are one stream for it: fuller batches, fewer streams.
        """
        groups: dict[tuple, list[BucketInfo]] = {}
        for info in self.buckets:
            if info.count and all(c in info.columns for c in columns) and (buckets is None or info.name in buckets):
                wanted = with_caption_columns(columns, info.columns)  # several captions travel with text_ids
                key = tuple((c, info.columns[c]["dtype"], tuple(info.columns[c]["shape"])) for c in wanted)
                groups.setdefault(key, []).append(info)
        return [BucketInfo.merge(parts, [c for c, _, _ in key]) for key, parts in groups.items()]

    def _reader(self, bucket: str | BucketInfo, columns: Sequence[str] | None) -> _RowGroupReader:
        info = self.bucket(bucket)
        columns = list(columns) if columns else list(info.columns)
        unknown = sorted(set(columns) - set(info.columns))
        if unknown:
            raise KeyError(f"bucket {info.name} has no columns {unknown}; it has {sorted(info.columns)}")
        return _RowGroupReader(self.fs, info, columns)

    def stream(
        self,
        bucket: str | BucketInfo,
        batch_size: int,
        columns: Sequence[str] | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_window: int | None = None,
    ) -> BucketStream:
        """Endless seeded batches of ``bucket`` for ``rank`` (disjoint rows across ranks per epoch).

        ``shuffle_window`` (rows shuffled together; default 4 batches) trades memory for mixing.
        A bucket with several captions per sample also yields them, and ``text_ids`` is one drawn
        per row and step (``data.captions``).
        """
        window = shuffle_window or 4 * batch_size
        if columns:
            columns = with_caption_columns(columns, self.bucket(bucket).columns)
        return BucketStream(self._reader(bucket, columns), batch_size, rank, world_size, seed, window)

    def iter_batches(
        self, bucket: str | BucketInfo, batch_size: int, columns: Sequence[str] | None = None
    ) -> Iterator[Batch]:
        """One pass over ``bucket`` in stored order (the last batch may be smaller), for eval."""
        reader = self._reader(bucket, columns)
        pending: list[Batch] = []
        held = 0
        for unit, (_, _, rows) in enumerate(reader.info.row_groups):
            pending.append(reader.read(unit, 0, rows))
            held += rows
            while held >= batch_size:
                merged = _concat(pending)
                yield _take(merged, slice(0, batch_size))
                pending, held = [_take(merged, slice(batch_size, None))], held - batch_size
        if held:
            yield _concat(pending)

    def ray_dataset(self, bucket: str | BucketInfo) -> ray.data.Dataset:
        """The bucket as a Ray Dataset of uniform rows (tensor columns restored by Ray)."""
        import ray.data

        info = self.bucket(bucket)
        paths = [filesystem(f, self.storage_options)[1] for f in info.files]
        return ray.data.read_parquet(paths, filesystem=self.fs, partitioning=None)


def raw_bucket_dataset(cfg: PipelineConfig, bucket: str) -> ray.data.Dataset:
    """Rows of one bucket decoded straight from the raw shards while streaming (no offline pass).

    Lets a cluster decode on CPU nodes while GPUs train; bad samples are dropped and logged
    by the same decode step the offline pipeline uses.
    """
    from imp_platform.data.pipeline import decoded_dataset

    return decoded_dataset(cfg, keep_bucket=bucket)[0]


__all__ = ["BucketInfo", "BucketStream", "ProcessedDataset", "raw_bucket_dataset"]
