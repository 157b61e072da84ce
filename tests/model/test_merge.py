"""Weight interpolation (UnIVAL): exact end points, every tensor as written by hand, named refusals, sweeps."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from imp_platform.cli import app
from imp_platform.config import ConfigError
from imp_platform.model import build_model, load_pretrained, save_pretrained
from imp_platform.model.merge import merge_models, merge_states, parse_sweep, parse_weights
from imp_platform.model.presets import preset


def export(root: Path, name: str, cfg, seed: int) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = build_model(cfg)
    return str(save_pretrained(model, cfg, root / name)), model.state_dict()


@pytest.fixture
def pair(tmp_path: Path):
    """Two MoE models of one architecture (stacked experts included), different weights."""
    cfg = preset("tiny", moe=True, heads={"digits": 10})
    return export(tmp_path, "a", cfg, 0), export(tmp_path, "b", cfg, 1)


def test_alpha_0_and_1_reproduce_the_inputs_bit_for_bit(pair) -> None:
    (_, a), (_, b) = pair
    for weights, expected in (([1.0, 0.0], a), ([0.0, 1.0], b)):
        merged = merge_states([a, b], weights)
        assert merged.keys() == expected.keys()
        assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_a_three_way_merge_equals_the_hand_written_interpolation_for_every_tensor(pair, tmp_path: Path) -> None:
    (path_a, a), (path_b, b) = pair
    path_c, c = export(tmp_path, "c", preset("tiny", moe=True, heads={"digits": 10}), 2)
    out = merge_models([path_a, path_b, path_c], [0.2, 0.5, 0.3], tmp_path / "merged")
    merged, cfg = load_pretrained(out)
    assert cfg == preset("tiny", moe=True, heads={"digits": 10})
    state = merged.state_dict()
    assert state.keys() == a.keys()
    for key in a:
        by_hand = (0.2 * a[key].double() + 0.5 * b[key].double() + 0.3 * c[key].double()).float()
        assert torch.equal(state[key], by_hand), key
        # float32 arithmetic agrees to rounding: the float64 sum is only more exact
        torch.testing.assert_close(state[key], 0.2 * a[key] + 0.5 * b[key] + 0.3 * c[key])
    assert json.loads((out / "merge.json").read_text())["weights"] == [0.2, 0.5, 0.3]


def test_a_head_in_only_some_models_is_carried_over_and_declared(tmp_path: Path) -> None:
    path_a, a = export(tmp_path, "a", preset("tiny", heads={"video": 10}), 0)
    path_b, b = export(tmp_path, "b", preset("tiny", heads={"video": 10, "audio": 5}), 1)
    out = merge_models([path_a, path_b], [0.5, 0.5], tmp_path / "merged")
    merged, cfg = load_pretrained(out)
    assert cfg.heads == {"video": 10, "audio": 5}
    state = merged.state_dict()
    assert torch.equal(state["heads.classifiers.audio.weight"], b["heads.classifiers.audio.weight"])
    assert torch.equal(state["heads.classifiers.video.bias"],
                       (0.5 * a["heads.classifiers.video.bias"].double()
                        + 0.5 * b["heads.classifiers.video.bias"].double()).float())
    assert json.loads((out / "merge.json").read_text())["heads"] == {"video": [path_a, path_b], "audio": [path_b]}


def test_incompatible_configs_are_refused_naming_each_field(tmp_path: Path) -> None:
    path_a, _ = export(tmp_path, "a", preset("tiny", moe=True, heads={"digits": 10}), 0)
    path_b, _ = export(tmp_path, "b", preset("tiny", moe=True, mlp_dim=192, heads={"digits": 12}), 1)
    cfg_c = preset("tiny", moe=True, heads={"digits": 10})
    cfg_c.moe = cfg_c.moe.model_copy(update={"num_experts": 8})
    path_c, _ = export(tmp_path, "c", cfg_c, 2)
    with pytest.raises(ConfigError) as err:
        merge_models([path_a, path_b, path_c], [0.4, 0.3, 0.3], tmp_path / "merged")
    message = str(err.value)
    assert f"mlp_dim: 384 in {path_a}, 192 in {path_b}" in message
    assert f"moe.num_experts: 4 in {path_a}, 8 in {path_c}" in message
    assert f"heads.digits: 10 classes in {path_a}, 12 classes in {path_b}" in message
    assert not (tmp_path / "merged").exists()


def test_cli_writes_a_merge_and_names_mistakes(pair, tmp_path: Path) -> None:
    (path_a, a), (path_b, b) = pair
    runner = CliRunner()
    result = runner.invoke(app, ["model", "merge", path_a, path_b, "--weights", "0,1", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    merged, _ = load_pretrained(tmp_path / "m")
    assert all(torch.equal(v, b[k]) for k, v in merged.state_dict().items())
    bad = runner.invoke(app, ["model", "merge", path_a, path_b, "--weights", "0.5,0.6", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "weights sum to 1.1, not 1" in bad.output
    bad = runner.invoke(app, ["model", "merge", path_a, path_b, "--sweep", "0:1:0.5", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--sweep with --eval" in bad.output


def test_weight_and_sweep_parsing() -> None:
    assert parse_weights(None, 4) == [0.25] * 4
    assert parse_sweep("0:1:0.1") == [i / 10 for i in range(11)]
    assert parse_sweep("0.2:0.5:0.25") == [0.2, 0.45]
    with pytest.raises(ConfigError, match="2 weights for 3 models"):
        parse_weights("0.5,0.5", 3)
    with pytest.raises(ConfigError, match="START:STOP:STEP"):
        parse_sweep("0:1")


@pytest.mark.slow
def test_a_sweep_scores_each_point_and_its_end_points_score_as_the_inputs(trained_checkpoint, tmp_path: Path) -> None:
    """A trained checkpoint against a perturbed copy of itself, on the run's own held-out split."""
    from imp_platform.eval.zeroshot import HeldOut
    from imp_platform.train.checkpoint import load_model, load_run_config

    model, cfg = load_model(trained_checkpoint)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    noisy = save_pretrained(model, cfg, tmp_path / "noisy")
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["model", "merge", trained_checkpoint, str(noisy), "--sweep", "0:1:0.5", "--eval",
                                      "--max-samples", "16", "--out", str(out), "--metric", "val_loss"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    with open(out / "sweep.csv") as fh:
        assert [float(r["alpha"]) for r in csv.DictReader(fh)] == [0.0, 0.5, 1.0]
    assert (out / "sweep.png").stat().st_size > 1000
    run_cfg = load_run_config(trained_checkpoint)
    run_cfg.eval.max_samples = 16
    heldout = HeldOut.open(run_cfg)
    assert rows[0]["val_loss"] == heldout.run(load_model(trained_checkpoint)[0]).metrics["val_loss"]
    assert rows[2]["val_loss"] == heldout.run(model.eval()).metrics["val_loss"]
