"""Kept samples as new tar shards: the original media, with the model's caption and label as the text.

Every member of a kept sample is copied byte for byte except its text members (the pipeline's
text extensions), which are replaced by one ``<key>.json`` holding only the generated caption
and the predicted label under the pipeline's caption and label keys: nothing of the split's own
text or labels (the hidden truth) reaches training.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from imp_platform.config.pipeline import PipelineConfig
from imp_platform.data.sources import filesystem, list_shards
from imp_platform.data.synth import add_member
from imp_platform.data.tars import read_samples
from imp_platform.selftrain.keep import Kept

SHARD_NAME = "kept-{:05d}.tar"


def write_kept(raw: str, kept: Kept, pipeline: PipelineConfig, out_dir: Path, tokenizer_json: str,
               samples_per_shard: int) -> list[Path]:
    """Write ``kept``'s samples, read from the shards under ``raw``, into ``out_dir`` (plus the
    tokenizer, so the folder preprocesses on its own); returns the shards written.

    Raises ValueError when a kept key is missing from ``raw`` (the predictions came from other data).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(SHARD_NAME.replace("{:05d}", "*")):
        stale.unlink()
    (out_dir / "tokenizer.json").write_text(tokenizer_json)
    text = {ext.lower() for ext in pipeline.modalities.extensions.get("text", [])}
    wanted = {key: (caption, label) for key, caption, label in zip(kept.keys, kept.captions, kept.labels)}
    shards: list[Path] = []
    tar: tarfile.TarFile | None = None
    written = 0
    try:
        for url in list_shards(raw, pipeline.source.storage_options).shards:
            fs, path = filesystem(url, pipeline.source.storage_options)
            with fs.open(path, "rb") as fh:
                for sample in read_samples(fh, url):
                    if sample.key not in wanted or sample.skip:
                        continue
                    if written % samples_per_shard == 0:
                        if tar is not None:
                            tar.close()
                        shards.append(out_dir / SHARD_NAME.format(len(shards)))
                        tar = tarfile.open(shards[-1], "w", format=tarfile.USTAR_FORMAT)
                    caption, label = wanted.pop(sample.key)
                    for ext, data in sorted(sample.members.items()):
                        if ext.lower() not in text:
                            add_member(tar, f"{sample.key}.{ext}", data)
                    meta = {pipeline.text.caption_key: caption, pipeline.dataset.label_key: label}
                    add_member(tar, f"{sample.key}.json", json.dumps(meta, sort_keys=True).encode())
                    written += 1
    finally:
        if tar is not None:
            tar.close()
    if wanted:
        raise ValueError(f"{len(wanted)} kept sample(s) not found in {raw}, e.g. {sorted(wanted)[:3]}")
    return shards
