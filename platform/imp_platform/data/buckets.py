"""Resolution/duration bucketing: native shape -> one of a few fixed shapes, and token budgeting.

IMP keeps the tokens per step about constant and trains each step at one shape, so every
sample is *resized* into the nearest of a small, fixed set of buckets (no padding inside a
bucket) and the batch size of a bucket follows from its tokens per sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from imp_platform.config.pipeline import PatchConfig
from imp_platform.data import modalities as registry

_ASPECT_EPS = 1e-6


def _aspect_distance(height: int, width: int, bucket_h: int, bucket_w: int) -> float:
    return abs(math.log(width / height) - math.log(bucket_w / bucket_h))


def _nearest_aspect(height: int, width: int, sizes: Sequence[tuple[int, int]]) -> list[int]:
    """Indices of the sizes whose aspect ratio is nearest to ``width/height`` (log distance, so 2:1 ~ 1:2)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"native size must be positive, got {height}x{width}")
    dists = [_aspect_distance(height, width, h, w) for h, w in sizes]
    best = min(dists)
    return [i for i, d in enumerate(dists) if d - best <= _ASPECT_EPS]


def _best_area(height: int, width: int, sizes: Sequence[tuple[int, int]], candidates: Sequence[int]) -> list[int]:
    """Among candidates, the largest area not above the native one (no upscaling), else the smallest."""
    native = height * width
    fitting = [i for i in candidates if sizes[i][0] * sizes[i][1] <= native]
    if fitting:
        area = max(sizes[i][0] * sizes[i][1] for i in fitting)
    else:
        fitting = list(candidates)
        area = min(sizes[i][0] * sizes[i][1] for i in fitting)
    return [i for i in fitting if sizes[i][0] * sizes[i][1] == area]


def pick_duration(duration_s: float, choices: Sequence[float], policy: str = "nearest") -> int:
    """Index of the clip length for an input of ``duration_s``: nearest, or longest not above it ("floor")."""
    if policy == "floor":
        fitting = [i for i, c in enumerate(choices) if c <= duration_s + 1e-9]
        if fitting:
            return max(fitting, key=lambda i: choices[i])
        return min(range(len(choices)), key=lambda i: choices[i])
    return min(range(len(choices)), key=lambda i: (abs(choices[i] - duration_s), choices[i]))


def pick_image_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(H, W) bucket for a native image: nearest aspect ratio, then the best-fitting area."""
    sizes = [tuple(b) for b in buckets]
    best = _best_area(height, width, sizes, _nearest_aspect(height, width, sizes))
    return sizes[best[0]]


def pick_video_bucket(
    height: int,
    width: int,
    duration_s: float,
    buckets: Sequence[tuple[int, int, int]],
    fps: float,
    policy: str = "nearest",
) -> tuple[int, int, int]:
    """(T, H, W) bucket: nearest aspect ratio, then the T whose clip (T/fps seconds) best matches the duration, then area."""
    sizes = [(h, w) for _, h, w in buckets]
    candidates = _nearest_aspect(height, width, sizes)
    seconds = [buckets[i][0] / fps for i in candidates]
    chosen_t = buckets[candidates[pick_duration(duration_s, seconds, policy)]][0]
    candidates = [i for i in candidates if buckets[i][0] == chosen_t]
    return tuple(buckets[_best_area(height, width, sizes, candidates)[0]])


def pick_video_buckets(
    height: int,
    width: int,
    duration_s: float,
    buckets: Sequence[tuple[int, int, int]],
    fps: float,
    policy: str = "nearest",
    resolutions: str | Sequence[tuple[int, int, int]] = "nearest",
) -> list[tuple[int, int, int]]:
    """Every (T, H, W) bucket one clip is written into (``video.resolutions``).

    ``nearest``: the one ``pick_video_bucket`` picks. ``all_fitting``: that one first, then every
    other bucket at the nearest aspect ratio whose area is not above the native one, any T (no
    spatial upscaling; a clip too small for every bucket still gets the nearest). A list: exactly
    those, in order (IMP trains each clip at several resolutions whatever its native one).
    """
    if not isinstance(resolutions, str):
        return [tuple(b) for b in resolutions]
    nearest = pick_video_bucket(height, width, duration_s, buckets, fps, policy)
    return _with_fitting(nearest, height, width, buckets, resolutions)


def pick_image_buckets(
    height: int, width: int, buckets: Sequence[tuple[int, int]], resolutions: str | Sequence[tuple[int, int]] = "nearest"
) -> list[tuple[int, int]]:
    """Every (H, W) bucket one image is written into (``image.resolutions``), as ``pick_video_buckets`` for clips."""
    if not isinstance(resolutions, str):
        return [tuple(b) for b in resolutions]
    return _with_fitting(pick_image_bucket(height, width, buckets), height, width, buckets, resolutions)


def _with_fitting(nearest: tuple[int, ...], height: int, width: int, buckets: Sequence[tuple[int, ...]],
                  resolutions: str) -> list[tuple[int, ...]]:
    """``[nearest]``, or for ``all_fitting`` it first and then every other bucket (its last two dims
    are H, W) at the nearest aspect ratio whose area is not above the native one."""
    if resolutions == "nearest":
        return [nearest]
    sizes = [tuple(b[-2:]) for b in buckets]
    fitting = [tuple(buckets[i]) for i in _nearest_aspect(height, width, sizes) if sizes[i][0] * sizes[i][1] <= height * width]
    return [nearest, *(b for b in fitting if b != nearest)]


def pick_text_length(num_tokens: int, lengths: Sequence[int]) -> int:
    """Shortest length bucket that holds ``num_tokens`` (the longest one truncates)."""
    fitting = [n for n in sorted(lengths) if n >= num_tokens]
    return fitting[0] if fitting else max(lengths)


def bucket_name(shapes: Mapping[str, Sequence[int]]) -> str:
    """Stable name from per-column shapes, e.g. ``v8x32x48_a128x128_t16``: registry tags in registry
    order, a trailing RGB dim of pixel columns omitted."""
    unknown = sorted(c for c in shapes if registry.of_column(c) is None)
    if unknown:
        raise ValueError(f"no bucket-name tag for columns {unknown}")
    parts = []
    for spec in registry.MODALITIES.values():
        if spec.column in shapes:
            dims = list(shapes[spec.column])
            if spec.dtype == "uint8" and dims and dims[-1] == 3:
                dims = dims[:-1]
            parts.append(spec.tag + "x".join(str(int(d)) for d in dims))
    return "_".join(parts)


def modality_tokens(column: str, shape: Sequence[int], patches: PatchConfig) -> int:
    """Tokens one sample of ``column`` (or modality name) becomes after patching (partial patches count as one)."""
    spec = registry.of_column(column) or registry.MODALITIES.get(column)
    if spec is None:
        raise ValueError(f"unknown column {column!r} for token counting")
    return math.prod(spec.grid(shape, spec.data_patch(patches), ceil=True))


def tokens_per_sample(shapes: Mapping[str, Sequence[int]], patches: PatchConfig) -> int:
    """All tokens of one sample across its tensor columns (``text_mask`` and scalars are not tokens)."""
    return sum(modality_tokens(c, s, patches) for c, s in shapes.items() if registry.of_column(c) is not None)


def batch_size_for(tokens_per_sample: int, token_budget: int) -> int:
    """Samples per step so a batch stays within ``token_budget`` tokens (at least one)."""
    if tokens_per_sample <= 0 or token_budget <= 0:
        raise ValueError(f"tokens_per_sample and token_budget must be positive, got {tokens_per_sample}, {token_budget}")
    return max(1, token_budget // tokens_per_sample)


def padding_waste(batches: Iterable[Sequence[int]]) -> float:
    """Padded tokens / all tokens when each batch is padded to its longest sample (token counts per sample)."""
    padded = real = 0
    for batch in batches:
        if len(batch):
            padded += max(batch) * len(batch)
            real += sum(batch)
    return 0.0 if padded == 0 else (padded - real) / padded


def _chunks(items: Sequence[int], size: int) -> list[Sequence[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def padding_waste_pad_to_max(token_counts: Sequence[int], batch_size: int) -> float:
    """Waste of the usual baseline: batches in input order, each padded to its longest sample."""
    return padding_waste(_chunks(list(token_counts), batch_size))


def padding_waste_bucketed(token_counts: Sequence[int], bucket_names: Sequence[str], batch_size: int) -> float:
    """Waste when batches are drawn from one bucket at a time (0 when buckets resize to one shape)."""
    groups: dict[str, list[int]] = {}
    for count, name in zip(token_counts, bucket_names, strict=True):
        groups.setdefault(name, []).append(count)
    return padding_waste(b for counts in groups.values() for b in _chunks(counts, batch_size))
