"""Each loss against its formula written out with Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from imp_platform.objectives import classification_loss, gather_with_grad, mil_nce_loss, nce_loss


def normalized(x: torch.Tensor) -> list[list[float]]:
    return (x / x.norm(dim=-1, keepdim=True)).tolist()


def dot(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v))


def info_nce(rows: list[list[float]], cols: list[list[float]], t: float) -> float:
    total = 0.0
    for i, r in enumerate(rows):
        logits = [dot(r, c) / t for c in cols]
        total += math.log(sum(math.exp(v) for v in logits)) - logits[i]
    return total / len(rows)


def test_nce_matches_formula() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(5, 8) * 3, torch.randn(5, 8)
    want = (info_nce(normalized(a), normalized(b), 0.2) + info_nce(normalized(b), normalized(a), 0.2)) / 2
    assert nce_loss(a, b, 0.2).item() == pytest.approx(want, rel=1e-5)


def test_nce_learnable_temperature_gets_gradient() -> None:
    log_t = torch.tensor(math.log(0.2), requires_grad=True)
    torch.manual_seed(0)
    nce_loss(torch.randn(4, 8), torch.randn(4, 8), log_t.exp()).backward()
    assert log_t.grad is not None and log_t.grad != 0


def test_mil_nce_matches_formula() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(4, 8), torch.randn(4, 3, 8)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    t = 0.1
    an = normalized(a)
    bn = [normalized(b[j]) for j in range(4)]
    s = lambda i, j, k: dot(an[i], bn[j][k]) / t  # noqa: E731
    real = lambda j: [k for k in range(3) if mask[j, k]]  # noqa: E731
    total = 0.0
    for i in range(4):
        pos = math.log(sum(math.exp(s(i, i, k)) for k in real(i)))
        den_ab = math.log(sum(math.exp(s(i, j, k)) for j in range(4) for k in real(j)))
        den_ba = math.log(sum(math.exp(s(j, i, k)) for j in range(4) for k in real(i)))
        total += (den_ab - pos) + (den_ba - pos)
    assert mil_nce_loss(a, b, t, mask=mask).item() == pytest.approx(total / 8, rel=1e-5)


def test_mil_nce_with_one_positive_is_nce() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    torch.testing.assert_close(mil_nce_loss(a, b[:, None], 0.07), nce_loss(a, b, 0.07))


def test_classification_loss_matches_formula_and_skips_unlabelled() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 5)
    labels = torch.tensor([0, 3, -1, 4])
    rows = [(logits[i].tolist(), int(labels[i])) for i in range(4) if labels[i] >= 0]
    want = sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in rows) / len(rows)
    assert classification_loss(logits, labels).item() == pytest.approx(want, rel=1e-5)


def test_gather_without_process_group_is_identity() -> None:
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x


def test_mil_nce_task_takes_every_stored_caption_as_a_positive() -> None:
    """A bucket with several captions per sample: run_task's MIL-NCE encodes each real caption
    (never a padding slot) and pools them as positives of their clip."""
    import numpy as np

    from imp_platform.config.train import PretrainConfig
    from imp_platform.model import build_model
    from imp_platform.train.tasks import resolve_model_config, run_task, tokens_per_sample

    cfg = PretrainConfig(tasks={"vt": {"modalities": ["video", "text"], "objectives": [{"kind": "mil_nce"}]}})
    torch.manual_seed(0)
    model = build_model(resolve_model_config(cfg)).eval()
    rng = np.random.default_rng(0)
    counts = [3, 1, 2]
    ids = rng.integers(2, 30, (3, 3, 6)).astype(np.int32)
    mask = (np.arange(6)[None, None] < 4) & (np.arange(3)[None, :, None] < np.array(counts)[:, None, None])
    batch = {"video": rng.integers(0, 255, (3, 4, 16, 16, 3), dtype=np.uint8), "text_ids": ids[:, 0] * mask[:, 0],
             "text_mask": mask[:, 0], "captions_ids": ids * mask, "captions_mask": mask}
    with torch.no_grad():
        got = run_task(model, "vt", cfg.tasks["vt"], batch, torch.device("cpu")).parts["mil_nce"]
        video = model.project(model.encode("video", torch.as_tensor(batch["video"]).float() / 255).pooled, "video", "text")
        texts = torch.zeros(3, 3, video.shape[-1])
        for row, n in enumerate(counts):
            for k in range(n):
                out = model.encode("text", torch.as_tensor(ids[row, k:k + 1] * mask[row, k:k + 1]).long(),
                                   mask=torch.as_tensor(mask[row, k:k + 1]))
                texts[row, k] = model.project(out.pooled, "text", "video")[0]
        want = mil_nce_loss(video, texts, model.temperature("video", "text"), mask=torch.as_tensor(mask.any(-1)))
        assert got.item() == pytest.approx(want.item(), rel=1e-4)
        batch["captions_ids"] = np.where(mask, batch["captions_ids"], 29)  # junk under the padding changes nothing
        assert run_task(model, "vt", cfg.tasks["vt"], batch, torch.device("cpu")).parts["mil_nce"].item() == pytest.approx(
            got.item(), rel=1e-5)
        single = run_task(model, "vt", cfg.tasks["vt"], {k: v for k, v in batch.items() if not k.startswith("captions")},
                          torch.device("cpu")).parts["mil_nce"]
        assert single.item() != pytest.approx(got.item(), rel=1e-3)  # one caption only: a different loss
    shapes = {"video": [4, 16, 16, 3], "text_ids": [6]}  # the token budget counts every caption MIL-NCE encodes
    extra = tokens_per_sample(model, cfg.tasks["vt"], {**shapes, "captions_ids": [3, 6]}) - tokens_per_sample(
        model, cfg.tasks["vt"], shapes)
    assert extra == 2 * model.num_tokens("text", (6,)) > 0
