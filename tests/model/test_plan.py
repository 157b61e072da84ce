"""The memory plan: its arithmetic per layout, the CLI, and the estimate against a measured CPU peak.

Measured peak: the live tensor bytes of building the model and running two training steps
(forward, backward, AdamW; the second has the optimizer state), from the profiler's
allocation and free events (``profile_memory``): what an accelerator's allocator would have to
hold, without the host allocator's fragmentation, shared libraries or the interpreter that an
RSS reading mixes in, so the figure is deterministic however loaded the machine is.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from typer.testing import CliRunner

from imp_platform.cli import app
from imp_platform.model import build_model, count_params, preset
from imp_platform.model.plan import GIB, _block_params, expert_params, plan


def test_replicate_holds_everything_and_fsdp_shards_the_state() -> None:
    cfg = preset("small", moe=True)
    total = count_params(cfg)["total"]
    one, many = plan(cfg, "replicate", 1, 1024), plan(cfg, "replicate", 16, 1024)
    assert one == plan(cfg, "replicate", 1, 1024) and (one.params, one.optimizer) == (many.params, many.optimizer)
    assert one.params == one.grads == 4 * total and one.optimizer == 8 * total
    fsdp, ep = plan(cfg, "fsdp", 16, 1024), plan(cfg, "fsdp+ep", 16, 1024, expert=16)
    assert fsdp.optimizer == ep.optimizer == pytest.approx(8 * total / 16)
    # each gathers one block at a time; with EP a sparse block gathers 1 of its 16 experts
    assert one.params / 16 < ep.params < fsdp.params < one.params
    assert fsdp.activations == ep.activations == one.activations


def test_activations_grow_with_tokens_and_experts_count_in_params() -> None:
    cfg = preset("tiny", moe=True)
    small, large = plan(cfg, "fsdp", 4, 1000), plan(cfg, "fsdp", 4, 3000)
    assert large.activations == pytest.approx(3 * small.activations)
    # the peak holds part of the activations next to the gradients made so far: it grows with them, by less
    assert 0 < large.peak - small.peak <= 2 * small.activations
    assert expert_params(cfg) == 2 * 4 * 2 * 96 * 384  # last 2 layers x 4 experts x (w1 + w2)
    assert expert_params(preset("tiny")) == 0


@pytest.mark.parametrize("moe", [False, True])
def test_block_parameter_counts_match_the_model(moe: bool) -> None:
    cfg = preset("tiny", moe=moe)
    sparse = set(cfg.sparse_layers())
    blocks = build_model(cfg).encoder.blocks
    counted = [_block_params(cfg, i in sparse, 1) for i in range(cfg.depth)]
    assert [sum(p.numel() for p in b.parameters()) for b in blocks] == counted


def test_bad_layouts_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="expert"):
        plan(preset("large", moe=True), "fsdp+ep", 64, 4096, expert=3)
    with pytest.raises(ValueError, match="MoE"):
        plan(preset("large"), "fsdp+ep", 64, 4096, expert=2)
    with pytest.raises(ValueError, match="parallel"):
        plan(preset("large"), "zero3", 64, 4096)  # type: ignore[arg-type]


def test_cli_prints_each_layout_and_which_fit() -> None:
    args = ["model", "plan", "--preset", "large", "--moe", "--gpus", "64", "--gpu-mem-gb", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 5}
    assert set(rows) == {"replicate", "fsdp", "fsdp+ep"}
    assert rows["replicate"].rstrip(" │").endswith("no") and rows["fsdp"].rstrip(" │").endswith("yes")
    assert "fits (under 90% of 8 GiB): fsdp, fsdp+ep" in result.output
    bad = CliRunner().invoke(app, [*args, "--parallel", "fsdp+ep", "--expert", "5"])
    assert bad.exit_code == 2 and "expert (5)" in bad.output


def measured_peak(name: str, batch: int, frames: int, side: int) -> tuple[int, float]:
    """(encoded tokens, peak live tensor bytes) of building ``name``-moe and two AdamW steps on a video batch."""
    cfg = preset(name, moe=True, heads={"cls": 10})
    clips, labels = torch.rand(batch, frames, side, side, 3), torch.randint(0, 10, (batch,))
    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, acc_events=True) as prof:
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for _ in range(2):
            out = model.encode("video", clips)
            loss = F.cross_entropy(model.classify(out.pooled, "cls"), labels) + out.aux_loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return out.tokens.shape[0] * out.tokens.shape[1], peak


@pytest.mark.parametrize(
    "name,batch,frames,side",
    [("tiny", 4, 4, 64), pytest.param("small", 2, 16, 128, marks=pytest.mark.slow)],
    ids=["tiny", "small"],
)
def test_estimate_is_within_25_percent_of_measured_peak(name: str, batch: int, frames: int, side: int) -> None:
    tokens, peak = measured_peak(name, batch, frames, side)
    cfg = preset(name, moe=True, heads={"cls": 10})
    estimate = plan(cfg, "replicate", 1, tokens, act_bytes=4, foreach=False).peak  # torch's AdamW default on CPU
    assert tokens == batch * (frames // 2 if name == "tiny" else frames // 4) * (side // (8 if name == "tiny" else 16)) ** 2
    assert abs(estimate - peak) <= 0.25 * peak, f"estimate {estimate / GIB:.3f} GiB vs measured {peak / GIB:.3f} GiB"
