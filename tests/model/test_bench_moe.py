"""The MoE benchmark's baselines compute the same function, and its memory probe sees activations."""

from __future__ import annotations

import pytest
import torch

from imp_platform.bench.moe import naive_forward, saved_activation_bytes
from imp_platform.config.model import MoEConfig
from imp_platform.model.encoder import DenseFFN
from imp_platform.model.moe import MoEFFN


@pytest.mark.parametrize("router", ["expert_choice", "top_k"])
def test_naive_loop_matches_layer(router: str) -> None:
    torch.manual_seed(0)
    layer = MoEFFN(16, 32, MoEConfig(num_experts=4, last_n=1, router=router, group_size=8))
    x = torch.randn(1, 20, 16)
    torch.testing.assert_close(naive_forward(layer, x), layer(x)[0], atol=1e-5, rtol=1e-5)


def test_saved_activation_bytes_counts_hidden_activations_not_weights() -> None:
    ffn = DenseFFN(8, 32, bias=False)
    x = torch.randn(10, 8, requires_grad=True)
    # fc1 output (saved by gelu) and gelu output (saved by fc2): 2 x 10 x 32 floats.
    assert saved_activation_bytes(lambda: ffn(x), [x, *ffn.parameters()]) == 2 * 10 * 32 * 4


def test_paired_ratio_is_the_median_of_per_round_ratios() -> None:
    from imp_platform.bench.moe import RoundTimes

    # Round 2 is a slow spell of the machine that hits both variants; round 3 only the dense one.
    times = RoundTimes(wall={"moe": [1.2, 12.0, 1.2], "dense": [1.0, 10.0, 3.0]}, cpu={"moe": [1.0], "dense": [2.0]})
    assert times.paired_ratio("moe", "dense") == pytest.approx(1.2)
    assert times.best("moe") / times.best("dense") == pytest.approx(1.2)
    assert times.paired_ratio("dense", "moe") == pytest.approx(1 / 1.2)
    assert times.cpu_ratio("moe", "dense") == pytest.approx(0.5)
