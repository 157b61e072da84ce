"""Several captions per sample: the per-step draw NCE sees, and the columns a stream hands MIL-NCE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from imp_platform.data.captions import draw_captions, flatten_captions, with_caption_columns
from imp_platform.data.stream import ProcessedDataset

K, L = 3, 4


def caption_batch(counts: list[int]) -> dict[str, np.ndarray]:
    """Rows whose caption k is the token ``10 * row + k + 1`` (padding slots all-False)."""
    ids = np.zeros((len(counts), K, L), dtype=np.int32)
    mask = np.zeros((len(counts), K, L), dtype=bool)
    for row, n in enumerate(counts):
        for k in range(n):
            ids[row, k, :2], mask[row, k, :2] = 10 * row + k + 1, True
    return {"key": np.array([f"s{row}" for row in range(len(counts))], dtype=object),
            "text_ids": ids[:, 0].copy(), "text_mask": mask[:, 0].copy(), "captions_ids": ids, "captions_mask": mask}


def test_draw_takes_each_real_caption_about_equally_and_never_padding() -> None:
    batch = caption_batch([3, 1, 2])
    seen = np.stack([draw_captions(batch, np.random.default_rng(s))["text_ids"][:, 0] for s in range(600)])
    assert set(seen[:, 0]) == {1, 2, 3} and set(seen[:, 1]) == {11} and set(seen[:, 2]) == {21, 22}
    share = np.mean(seen[:, 0] == 2)
    assert 0.25 < share < 0.42  # a third, with slack for 600 draws
    drawn = draw_captions(batch, np.random.default_rng(7))
    assert (drawn["text_mask"].sum(1) == 2).all()  # mask travels with its ids
    np.testing.assert_array_equal(drawn["text_ids"], draw_captions(batch, np.random.default_rng(7))["text_ids"])


def test_flatten_keeps_only_real_captions_in_row_order() -> None:
    real, text = flatten_captions(caption_batch([3, 1, 2]))
    assert real.sum(1).tolist() == [3, 1, 2]
    assert text["text_ids"][:, 0].tolist() == [1, 2, 3, 11, 21, 22] and text["text_mask"].any(1).all()


def test_a_three_caption_sample_keeps_all_three_through_decode_and_write(tmp_path: Path) -> None:
    """decode -> packed rows -> the bucket's parquet table (the writer's own functions, no Ray):
    ``text.max_captions=4`` keeps the three non-empty captions, in order, as ``captions_ids``."""
    import io
    import json

    from PIL import Image

    from imp_platform.data.dataset import train_tokenizer
    from imp_platform.data.decode import decode_sample, tokenize
    from imp_platform.data.pipeline import _bucket_table, _column_spec, _pack, load_preprocess_config
    from imp_platform.data.stream import _column_to_numpy

    texts = ["a red disc", "", "a small red disc rolls to the left slowly", "red"]
    tokenizer = train_tokenizer(texts * 4, vocab_size=60)
    png = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 20, 20)).save(png, format="PNG")
    cfg = load_preprocess_config(None, str(tmp_path), str(tmp_path / "out"), [
        "modalities.enabled=[image,text]", "modalities.required=[image,text]", "image.buckets=[[32,32]]",
        "text.length_buckets=[4,16]", "text.max_captions=4", "dataset.classes=null"])
    sample = {"__key__": "s0", "png": png.getvalue(), "json": json.dumps({"caption": texts}).encode()}
    rows = decode_sample(sample, cfg, tokenizer)
    packed = _pack([rows])
    table = pa.table({c: pa.array(list(v)) for c, v in packed.items()})
    layout = json.loads(packed["layout"][0])
    stored = _bucket_table(table, layout, with_caption=True)
    spec = _column_spec(stored, layout)
    ids = _column_to_numpy(stored.column("captions_ids"), spec["captions_ids"])[0]
    mask = _column_to_numpy(stored.column("captions_mask"), spec["captions_mask"])[0]
    assert spec["captions_ids"]["shape"] == [4, 16]  # the length bucket of the longest caption
    kept = [t for t in texts if t]
    for k, text in enumerate(kept):
        want_ids, want_mask = tokenize(text, tokenizer, 16)
        assert (ids[k] == want_ids).all() and (mask[k] == want_mask).all()
    assert not mask[3].any()  # a fourth slot, all padding
    assert (_column_to_numpy(stored.column("text_ids"), spec["text_ids"])[0] == ids[0]).all()


def write_processed(root: Path, counts: list[int]) -> ProcessedDataset:
    """A one-bucket processed split written by hand (the layout ``data.pipeline`` writes)."""
    batch = caption_batch(counts)
    table = pa.table({"key": batch["key"].tolist(),
                      **{c: pa.array(batch[c].tolist()) for c in ("text_ids", "text_mask", "captions_ids", "captions_mask")}})
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "part.parquet", row_group_size=4)
    columns = {"key": {"dtype": "str", "shape": []},
               "text_ids": {"dtype": "int32", "shape": [L]}, "text_mask": {"dtype": "bool", "shape": [L]},
               "captions_ids": {"dtype": "int32", "shape": [K, L]}, "captions_mask": {"dtype": "bool", "shape": [K, L]}}
    groups = [min(4, len(counts) - i) for i in range(0, len(counts), 4)]
    entry = {"name": f"t{L}", "count": len(counts), "shape": {c: s["shape"] for c, s in columns.items() if s["shape"]},
             "files": [{"path": "part.parquet", "row_groups": groups}], "columns": columns}
    return ProcessedDataset(str(root), {"buckets": [entry]}, None)


def test_stream_draws_a_caption_per_step_seeded_and_resumable(tmp_path: Path) -> None:
    counts = [3, 3, 2, 3, 1, 3, 3, 2]
    dataset = write_processed(tmp_path, counts)
    (view,) = dataset.views(["key", "text_ids", "text_mask"])
    assert "captions_ids" in view.columns  # the captions travel with text_ids for MIL-NCE
    assert with_caption_columns(["video"], view.columns) == ["video"]

    def run(stream, steps: int) -> list[dict[str, np.ndarray]]:
        return [next(stream) for _ in range(steps)]

    first = dataset.stream(view, 4, ["key", "text_ids", "text_mask"], seed=5)
    batches = run(first, 3)
    state = first.state_dict()
    rest = run(first, 5)
    first.close()
    for batch in batches + rest:  # the drawn caption is one of the row's own, and MIL-NCE gets them all
        rows = [int(k[1:]) for k in batch["key"]]
        assert all(t // 10 == r and 1 <= t % 10 <= counts[r] for t, r in zip(batch["text_ids"][:, 0], rows, strict=True))
        assert batch["captions_mask"].any(-1).sum(1).tolist() == [counts[r] for r in rows]
    drawn = [t for batch in batches + rest for t in batch["text_ids"][:, 0] if t // 10 == 0]
    assert len(set(drawn)) > 1  # sample 0 shows different captions over its six epochs
    resumed = dataset.stream(view, 4, ["key", "text_ids", "text_mask"], seed=5)
    resumed.load_state_dict(state)
    again = run(resumed, 5)
    resumed.close()
    for got, want in zip(again, rest, strict=True):
        np.testing.assert_array_equal(got["text_ids"], want["text_ids"])
        assert got["key"].tolist() == want["key"].tolist()
    # Eval's stored-order pass reads the first caption, no draw.
    (stored,) = dataset.iter_batches(view, 8, ["key", "text_ids"])
    assert stored["text_ids"][:, 0].tolist() == [10 * r + 1 for r in range(8)]


def test_semantic_retrieval_counts_any_of_a_clips_captions() -> None:
    """Eval embeds each sample's first caption; it is a semantic hit for a clip holding it among its captions."""
    import torch

    from imp_platform.eval.zeroshot import Features, caption_set, recall_at_k, semantic_groups

    metas = [json_meta(["a dog", "a pet"]), json_meta(["a cat"]), None]
    captions = np.array(["a dog", "a cat", "a pet"], dtype=object)
    feats = Features({}, np.full(3, -1), captions, [caption_set(c, m) for c, m in zip(captions, metas, strict=True)])
    assert feats.caption_sets == [("a dog", "a pet"), ("a cat",), ("a pet",)]
    # Clip 0 ranks text 2 ("a pet", one of its captions) first; clip 2 ranks text 0 first ("a dog": not clip 2's).
    sim = torch.tensor([[0.1, 0.0, 0.9], [0.0, 1.0, 0.0], [0.9, 0.0, 0.1]])
    groups = semantic_groups(feats, text_side=1)
    # a->b: clip 0 hit (a pet), clip 1 hit, clip 2 miss; b->a: text 0 "a dog" -> clip 2 miss,
    # text 1 hit, text 2 "a pet" -> clip 0 hit.
    assert recall_at_k(sim, (1,), groups) == {1: pytest.approx(2 / 3)}
    assert recall_at_k(sim, (1,)) == {1: pytest.approx(1 / 3)}  # instance recall: only the diagonal
    single = Features({}, np.full(3, -1), captions)  # without caption lists, only the same caption
    assert recall_at_k(sim, (1,), semantic_groups(single, text_side=1)) == {1: pytest.approx(1 / 3)}


def json_meta(captions: list[str]) -> str:
    import json

    return json.dumps({"captions": captions})
