"""``platform bench data``: our Ray Data preprocess against its baselines, measured in one run.

(a) ceiling: the same decode functions (decord video, soundfile/torchaudio audio, tokenizers,
PIL) called straight from tar files, one process per core, no framework; (b) what users pick
instead: torch DataLoader + webdataset with the same decode step and the same number of
workers; (c) our pipeline doing the same work: tar shard reader -> decode (tasks or actors) -> bucketed
rows consumed by the driver (as training streams from raw shards), and once more as a full
preprocess that also writes parquet + manifest. Rates are reported in steady state (from the
first output on: the targets) and end to end (start-up included). Also the padding waste of bucketed
batches vs native shapes padded to the batch maximum, and the peak RSS of the driver plus
every Ray process at 1x and 10x the input (10x = the same shards listed ten times).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imp_platform.bench.common import Throughput, write_results
from imp_platform.config.pipeline import PipelineConfig
from imp_platform.data import buckets, decode
from imp_platform.data.pipeline import (decode_compute, decode_or_skip, decoded_dataset, load_preprocess_config, preprocess,
                                        resolve_tokenizer)
from imp_platform.data.tars import RawSample, read_samples
from imp_platform.memory import PeakMemory

log = logging.getLogger(__name__)

PAD_BATCH = 16  # batch size used for both padding-waste figures
MEMORY_SCALE = 10


def _tar_samples(path: str) -> Iterator[RawSample]:
    """The samples of a local shard, read as the pipeline reads them."""
    with open(path, "rb") as fh:
        yield from read_samples(fh, path)


# ------------------------------------------------------------------ (a) no-framework ceiling

_worker: dict[str, Any] = {}


def _init_worker(cfg: PipelineConfig, tokenizer_json: str | None) -> None:
    import torch

    torch.set_num_threads(1)
    _worker["cfg"], _worker["tok"] = cfg, decode.load_tokenizer(tokenizer_json) if tokenizer_json else None


def _decode_shard(path: str) -> int:
    count = 0
    for sample in _tar_samples(path):
        decode_or_skip(sample, _worker["cfg"], _worker["tok"])
        count += 1
    return count


def _video_only_shard(path: str) -> int:
    """Only the video members (header probe + decord resize-at-decode of the sampled frames)."""
    cfg = _worker["cfg"]
    count = 0
    for sample in _tar_samples(path):
        if "mp4" in sample.members:
            decode.decode_video(sample.members["mp4"], cfg.video.buckets[0], cfg.video.fps, limits=cfg.limits)
            count += 1
    return count


def _pool_counts(cfg: PipelineConfig, shards: list[str], workers: int, fn: Any) -> Iterator[int]:
    tokenizer = resolve_tokenizer(cfg, shards)
    with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(cfg, tokenizer)) as pool:
        yield from pool.imap_unordered(fn, shards)


def ceiling(cfg: PipelineConfig, shards: list[str], workers: int, fn: Any = _decode_shard) -> Throughput:
    """``fn`` over the shards in a plain process pool (one process per core); one output per shard."""
    return Throughput.measure(_pool_counts(cfg, shards, workers, fn))


# ------------------------------------------------------------------ (b) DataLoader + webdataset


class _WdsDecode:
    """Picklable map function for webdataset: the same decode step as the Ray decode actors."""

    def __init__(self, cfg: PipelineConfig, tokenizer_json: str | None) -> None:
        self.cfg, self.tokenizer_json = cfg, tokenizer_json

    def __call__(self, sample: dict[str, Any]) -> int:
        tok = decode.load_tokenizer(self.tokenizer_json) if self.tokenizer_json else None
        members = {k: v for k, v in sample.items() if not k.startswith("__") and isinstance(v, bytes)}
        decode_or_skip(RawSample(sample["__key__"], members), self.cfg, tok)
        return 1


def _torch_worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def _loader_counts(cfg: PipelineConfig, shards: list[str], workers: int) -> Iterator[int]:
    import webdataset as wds
    from torch.utils.data import DataLoader

    dataset = wds.WebDataset(shards, shardshuffle=False, empty_check=False).map(_WdsDecode(cfg, resolve_tokenizer(cfg, shards)))
    yield from DataLoader(dataset, batch_size=None, num_workers=workers, worker_init_fn=_torch_worker_init)


def dataloader(cfg: PipelineConfig, shards: list[str], workers: int) -> Throughput:
    """torch DataLoader(num_workers) over webdataset with the same decode step; one output per sample."""
    return Throughput.measure(_loader_counts(cfg, shards, workers))


# ------------------------------------------------------------------ (c) ours, with memory


def _stream_counts(cfg: PipelineConfig) -> Iterator[int]:
    ds, _ = decoded_dataset(cfg)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield batch.num_rows


def ours_stream(cfg: PipelineConfig) -> Throughput:
    """The pipeline doing what the baselines do: read -> decode (``decode.compute``) -> bucketed rows, consumed here."""
    return Throughput.measure(_stream_counts(cfg))


def ours(cfg: PipelineConfig) -> tuple[Throughput, dict[str, Any]]:
    """One full preprocess run (decode, bucket, write parquet + manifest) and its manifest."""
    manifest: dict[str, Any] = {}

    def run_once() -> Iterator[int]:
        manifest.update(preprocess(cfg))
        yield manifest["total_read"]

    return Throughput.measure(run_once()), manifest


def ours_memory(cfg: PipelineConfig) -> tuple[int, float, PeakMemory, dict[str, Any]]:
    """Samples, idle RSS (MB), the peak memory sampler and the manifest of one preprocess run.

    Kept apart from the timed run: reading every process's smaps_rollup ten times a second costs CPU.
    """
    idle, _ = PeakMemory().sample()
    with PeakMemory() as peak:
        timed, manifest = ours(cfg)
    return timed.items, idle, peak, manifest


# ------------------------------------------------------------------ padding waste


def _native_tokens(key: str, members: dict[str, bytes], cfg: PipelineConfig, tokenizer: Any) -> int:
    """Tokens of one sample at its native shapes (the same clip length in frames, native H x W and duration)."""
    found = decode.split_members({"__key__": key, **members}, cfg)
    patches = cfg.patches
    total = 0
    if "video" in found:
        info = decode.probe_video(found["video"][0][1], cfg.limits)
        fps = cfg.video.fps or info.fps or 1.0
        frames = buckets.pick_video_bucket(info.height, info.width, info.duration_s, cfg.video.buckets, fps,
                                           cfg.bucket_policy.duration)[0]  # same clip length, native H x W
        total += buckets.modality_tokens("video", (frames, info.height, info.width), patches)
    if "audio" in found:
        ext, data = found["audio"][0]
        clip = decode.decode_audio(data, ext, cfg.limits)
        frames = int(clip.duration_s * cfg.audio.sample_rate) // cfg.audio.hop_length
        total += buckets.modality_tokens("audio_mel", (frames, cfg.audio.n_mels), patches)
    if "image" in found:
        height, width = decode.probe_image(found["image"][0][1], cfg.limits)
        total += buckets.modality_tokens("image", (height, width), patches)
    if "text" in found:
        ext, data = found["text"][0]
        caption = decode.decode_text(data, ext, cfg.text.caption_key).caption
        total += min(len(tokenizer.encode(caption).ids), cfg.text.max_tokens)
    return total


def padding_waste(cfg: PipelineConfig, shards: list[str], output: str) -> dict[str, float]:
    """Padded / all tokens: bucketed batches (stored tensors, text padding included) vs native shapes padded to max."""
    from imp_platform.data.stream import ProcessedDataset

    tokenizer = decode.load_tokenizer(resolve_tokenizer(cfg, shards))
    native = [_native_tokens(s.key, s.members, cfg, tokenizer) for shard in shards for s in _tar_samples(shard)]
    padded = total = text_slots = 0
    dataset = ProcessedDataset.open(output)
    for info in dataset.buckets:
        for batch in dataset.iter_batches(info.name, PAD_BATCH, ["text_mask"] if "text_mask" in info.columns else ["key"]):
            n = len(next(iter(batch.values())))
            total += n * buckets.tokens_per_sample(info.shape, cfg.patches)
            if "text_mask" in batch:
                padded += int((~batch["text_mask"]).sum())  # the only padding: text up to its length bucket
                text_slots += batch["text_mask"].size
    return {
        "padding_waste_bucketed": padded / total if total else 0.0,
        # video, audio and image are resampled to their bucket's exact shape: no padding at all
        "padding_waste_bucketed_text_only": padded / text_slots if text_slots else 0.0,
        "padding_waste_pad_to_max": buckets.padding_waste_pad_to_max(native, PAD_BATCH),
        "padding_batch_size": PAD_BATCH,
    }


# ------------------------------------------------------------------ driver


def _ratios(runs: dict[str, Throughput]) -> dict[str, float]:
    """Ours over each baseline: steady state (the targets; start-up is a fixed cost a long run
    amortizes) and end to end (what this short input gets, Ray's decode workers' start included)."""
    ours_run = runs["c_ray_data_pipeline"]
    out: dict[str, float] = {}
    for key, base in (("dataloader", "b_dataloader_webdataset"), ("ceiling", "a_ceiling_same_decode"),
                      ("ceiling_video_only", "a_ceiling_video_only")):
        out[f"ratio_vs_{key}"] = round(ours_run.steady_rate / runs[base].steady_rate, 3)
        out[f"ratio_vs_{key}_end_to_end"] = round(ours_run.rate / runs[base].rate, 3)
    out["ratio_preprocess_with_write_vs_dataloader_end_to_end"] = round(
        runs["c_preprocess_with_write"].rate / runs["b_dataloader_webdataset"].rate, 3)
    return out


def _input(root: Path, quick: bool) -> list[str]:
    from imp_platform.data.synth import write_dataset

    samples, shards = (32, 2) if quick else (128, 4)
    summary = write_dataset(root, samples=samples, shards=shards, seed=0, split="train")
    return [str(p) for p in summary.shards]


def _replicate(root: Path, shards: list[str], name: str, times: int) -> tuple[Path, list[str]]:
    """``times`` x the input without re-encoding: hard links to the same shards, plus the tokenizer."""
    folder = root / name / "train"
    folder.mkdir(parents=True)
    shutil.copy(root / "raw" / "tokenizer.json", root / name / "tokenizer.json")
    copies = []
    for i in range(times):
        for shard in shards:
            copies.append(folder / f"copy{i:02d}-{Path(shard).name}")
            os.link(shard, copies[-1])
    return folder, [str(c) for c in copies]


def run(quick: bool, out: Path) -> dict[str, Any]:
    """Measure (a), (b), (c), padding waste and peak RSS at 1x/10x; write and return the JSON.

    Speeds use the synth shards repeated (2x quick, 32x full: 4096 samples, about 40 s of
    decoding, the scale at which a real preprocess's start-up stops mattering). All three
    start warm as far as each allows: the baselines fork from this process after it imported
    the decoders; Ray's decode tasks run on pooled workers that the memory runs before them
    started, while decode actors (``decode.compute``: ``auto`` picks them for the full-size
    input) are new processes importing ray.data, torch, torchaudio and decord: ~10 s on
    2 cores, which the end-to-end figures include.
    """
    import ray

    workers = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    settings = [f"decode.num_actors={workers}"]
    try:
        base = _input(work / "raw", quick)
        speed_dir, speed = _replicate(work, base, "speed", 2 if quick else 32)
        cfg = load_preprocess_config(None, str(speed_dir), str(work / "out-speed"), settings)
        # Import the decoders here once so forked baseline workers start warm (Ray's workers import their own).
        decode_or_skip(next(_tar_samples(base[0])), cfg, decode.load_tokenizer(resolve_tokenizer(cfg, base)))
        # The baselines fork worker processes: run them before Ray starts its threads here.
        runs = {"a_ceiling_same_decode": ceiling(cfg, speed, workers),
                "a_ceiling_video_only": ceiling(cfg, speed, workers, _video_only_shard),
                "b_dataloader_webdataset": dataloader(cfg, speed, workers)}
        if not ray.is_initialized():
            ray.init(num_cpus=workers + 2, include_dashboard=False, log_to_driver=False)
        # The memory runs go first, back to back under the same conditions; the 1x run also warms
        # the page cache and the Ray worker pool for the timed runs.
        cfg1 = load_preprocess_config(None, str(work / "raw" / "train"), str(work / "out-1x"), settings)
        n_1x, idle_1x, peak_1x, manifest = ours_memory(cfg1)
        ten_dir, _ = _replicate(work, base, "ten", MEMORY_SCALE)
        cfg10 = load_preprocess_config(None, str(ten_dir), str(work / "out-10x"), settings)
        n_10x, idle_10x, peak_10x, _ = ours_memory(cfg10)
        rss_1x, rss_10x = peak_1x.peak_mb, peak_10x.peak_mb
        log.info("peak RSS %.0f MB at %d samples, %.0f MB at %d", rss_1x, n_1x, rss_10x, n_10x)
        runs["c_ray_data_pipeline"] = ours_stream(cfg)
        runs["c_preprocess_with_write"] = ours(cfg)[0]
        for name, timed in runs.items():
            log.info("%s: %.1f samples/s steady, %.1f end to end (%d samples, first output after %.1f s)",
                     name, timed.steady_rate, timed.rate, timed.items, timed.first_output_s)

        result = {
            "quick": quick,
            "cores": workers,
            "decode_compute": decode_compute(cfg.decode, sum(os.path.getsize(s) for s in speed)),
            "speed_samples": runs["c_ray_data_pipeline"].items,
            "samples_per_s": {name: round(timed.steady_rate, 3) for name, timed in runs.items()},
            "samples_per_s_end_to_end": {name: round(timed.rate, 3) for name, timed in runs.items()},
            "runs": {name: timed.summary() for name, timed in runs.items()},
            **_ratios(runs),
            **padding_waste(cfg1, base, cfg1.output.path),
            "memory_samples": {"1x": n_1x, f"{MEMORY_SCALE}x": n_10x},
            "peak_rss_mb": {"1x": round(rss_1x, 1), f"{MEMORY_SCALE}x": round(rss_10x, 1)},
            "peak_rss_growth": round(rss_10x / rss_1x, 3),
            "peak_pss_mb": {"1x": round(peak_1x.peak_pss_mb, 1), f"{MEMORY_SCALE}x": round(peak_10x.peak_pss_mb, 1)},
            "peak_pss_growth": round(peak_10x.peak_pss_mb / peak_1x.peak_pss_mb, 3),
            # the same peaks minus the idle Ray processes measured just before each run
            "peak_rss_over_idle_mb": {"1x": round(rss_1x - idle_1x, 1), f"{MEMORY_SCALE}x": round(rss_10x - idle_10x, 1)},
            "buckets": {b["name"]: b["count"] for b in manifest["buckets"]},
            "skipped": manifest["skipped"],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return write_results(out, "data", result)
