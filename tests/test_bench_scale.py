"""``platform bench scale``: the collective byte model, the core cap, and one short run at 1 and 2 workers.

The run is the bench itself with two worker counts (4 would cost a third group of processes on
a 2-core machine): every layout, the memory measurements, the plan check and the JSON keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist

from imp_platform.bench import scale


@pytest.fixture
def one_rank_group(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_counting_sees_every_collective_and_a_lone_rank_sends_nothing(one_rank_group) -> None:
    import torch

    sent: dict[str, list[float]] = {}
    x = torch.ones(10)
    with scale._counted(sent):
        dist.all_reduce(x)
        dist.all_to_all_single(torch.empty(10), x, [10], [10])
        dist.broadcast(x, src=0)
    dist.all_reduce(x)  # not counted: the originals are back
    assert sent == {"all_reduce": [40.0, 0.0], "all_to_all_single": [40.0, 0.0], "broadcast": [40.0, 0.0]}


def test_wire_model_of_four_ranks() -> None:
    assert scale.WIRE["all_reduce"](4) == 1.5 and scale.WIRE["all_gather_into_tensor"](4) == 3
    assert scale.WIRE["reduce_scatter_tensor"](4) == 0.75 and scale.WIRE["all_reduce"](1) == 0


def test_more_workers_than_cores_is_said_and_bounds_the_efficiency() -> None:
    usable = scale._cores((1,))["usable_cores"]
    many = scale._cores((1, 2 * usable))
    assert many["efficiency_ceiling"][f"workers_{2 * usable}"] == 0.5
    assert f"share {usable} usable cores" in many["cores_cap"] and "0.50" in many["cores_cap"]
    assert scale._cores((1, usable))["cores_cap"] is None


@pytest.mark.slow
def test_quick_run_at_one_and_two_workers(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    result = scale.run(True, out, worlds=(1, 2))
    assert json.loads(out.read_text())["weak_scaling_efficiency"] == result["weak_scaling_efficiency"]
    layouts = result["layouts"]
    assert set(layouts["fsdp+ep"]) == {"workers_2"}, "expert parallel 2 needs 2 workers"
    one, two = layouts["replicate"]["workers_1"], {name: got["workers_2"] for name, got in layouts.items()}
    assert one["wire_bytes_per_step"] == 0 and two["replicate"]["wire_bytes_per_step"] > 0
    assert set(two["fsdp+ep"]["wire_bytes_by_collective"]) >= {"all_to_all_single", "all_gather_into_tensor"}
    assert two["fsdp+ep"]["wire_bytes_by_collective"]["all_to_all_single"] > 0
    assert "all_to_all_single" not in two["fsdp"]["wire_bytes_by_collective"]
    # FSDP holds half of the parameters + grads + AdamW state on 2 workers (the 0-d temperatures stay whole)
    assert result["fsdp_state_mem_ratio_vs_replicate"] == pytest.approx(0.5, abs=0.01)
    assert two["fsdp"]["state_mb_per_worker"] == pytest.approx(two["replicate"]["state_mb_per_worker"] / 2, rel=0.02)
    memory = result["memory"]
    for name in scale.LAYOUTS:
        assert two[name]["tokens_per_s_per_worker"] > 0
        got = memory[name]
        assert got["peak_tensor_mb_per_worker"] > got["state_mb_per_worker"] > 0, memory  # the peak holds the state
        assert 0 < got["setup_peak_tensor_mb_per_worker"] and "peak_rss_mb_per_worker" in got, memory
        assert abs(got["plan_vs_measured"] - 1) <= 0.25, memory
    assert 0 < result["weak_scaling_efficiency"] and result["cores"]["usable_cores"] >= 1


def test_plan_holds_expert_shards_outside_fsdp() -> None:
    """The plan the bench checks counts what ``train/parallel.py`` does: EP shards replicated over the EP groups."""
    from imp_platform.model import count_params, preset
    from imp_platform.model.plan import expert_params, plan

    cfg = preset("small", moe=True)
    total, experts = count_params(cfg)["total"], expert_params(cfg)
    assert plan(cfg, "fsdp+ep", 4, 192, expert=2).optimizer == pytest.approx(8 * ((total - experts) / 4 + experts / 2))
    assert plan(cfg, "fsdp+ep", 4, 192, expert=4).optimizer == pytest.approx(plan(cfg, "fsdp", 4, 192).optimizer)
