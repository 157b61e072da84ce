"""Starting from another model: exact loads, named shape/key problems, reinit, freeze, upcycling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from imp_platform.config import ConfigError
from imp_platform.config.train import ModelSpec, load_pretrain_config
from imp_platform.model import build_model, save_pretrained
from imp_platform.model.init import init_model, read_model
from imp_platform.model.presets import preset
from imp_platform.train.checkpoint import COMPLETE, TRAIN_STATE, CheckpointError
from imp_platform.train.optim import build_optimizer

REPO = Path(__file__).resolve().parents[2]
CLIP = (2, 4, 32, 32, 3)


def export(tmp_path: Path, cfg, seed: int = 0, name: str = "source") -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    model = build_model(cfg)
    return save_pretrained(model, cfg, tmp_path / name), model


def fresh(cfg, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys) -> None:
    for key in keys:
        assert torch.equal(a[key], b[key]), key


def test_init_from_an_export_reproduces_every_weight(tmp_path: Path) -> None:
    cfg = preset("tiny", moe=True, heads={"digits": 10})
    path, source = export(tmp_path, cfg)
    model = fresh(cfg)
    plan = init_model(model, ModelSpec(init_from=str(path)), cfg)
    assert len(plan.load) == len(source.state_dict()) and not plan.lines()
    assert_same(model.state_dict(), source.state_dict(), source.state_dict())


def test_a_head_of_another_shape_is_refused_by_name_and_reinitialised_when_declared(tmp_path: Path) -> None:
    path, source = export(tmp_path, preset("tiny", heads={"digits": 10}))
    cfg = preset("tiny", heads={"digits": 12})
    with pytest.raises(ConfigError) as err:
        init_model(fresh(cfg), ModelSpec(init_from=str(path)), cfg)
    message = str(err.value)
    assert "heads.classifiers.digits.weight: shape [10, 96] in" in message and "[12, 96] in the model" in message
    assert "heads.classifiers.digits.bias" in message and "model.reinit" in message

    model = fresh(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = init_model(model, ModelSpec(init_from=str(path), reinit=["heads.classifiers.*"]), cfg)
    head = {"heads.classifiers.digits.weight", "heads.classifiers.digits.bias"}
    assert set(plan.fresh) == head
    assert_same(model.state_dict(), before, head)  # its fresh init, untouched
    assert_same(model.state_dict(), source.state_dict(), set(before) - head)


def test_keys_only_one_side_has_are_refused_when_strict_and_reported_otherwise(tmp_path: Path) -> None:
    path, _ = export(tmp_path, preset("tiny", heads={"video_cls": 10}))
    cfg = preset("tiny", heads={"digits_ft": 10})
    with pytest.raises(ConfigError, match=r"(?s)heads.classifiers.digits_ft.weight: not in .*"
                                          r"heads.classifiers.video_cls.weight: in .*, not in the model"):
        init_model(fresh(cfg), ModelSpec(init_from=str(path)), cfg)
    plan = init_model(fresh(cfg), ModelSpec(init_from=str(path), init_strict=False), cfg)
    assert set(plan.fresh) == {"heads.classifiers.digits_ft.weight", "heads.classifiers.digits_ft.bias"}
    assert set(plan.dropped) == {"heads.classifiers.video_cls.weight", "heads.classifiers.video_cls.bias"}


def test_patterns_that_match_nothing_and_options_without_a_source_are_errors(tmp_path: Path) -> None:
    cfg = preset("tiny")
    path, _ = export(tmp_path, cfg)
    with pytest.raises(ConfigError, match=r"model.reinit: \['head.\*'\] match no key"):
        init_model(fresh(cfg), ModelSpec(init_from=str(path), reinit=["head.*"]), cfg)
    with pytest.raises(ConfigError, match=r"model.freeze: \['embeds.\*'\] match no parameter"):
        init_model(fresh(cfg), ModelSpec(freeze=["embeds.*"]), cfg)
    with pytest.raises(ValueError, match="reinit: only applies with model.init_from"):
        ModelSpec(reinit=["heads.*"])
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nowhere"):
        init_model(fresh(cfg), ModelSpec(init_from=str(tmp_path / "nowhere")), cfg)


def test_frozen_parameters_stay_bit_for_bit_through_optimizer_steps() -> None:
    cfg = preset("tiny", moe=True, heads={"digits": 10})
    model = fresh(cfg)
    init_model(model, ModelSpec(freeze=["embed.*", "encoder.blocks.0.*", "encoder.blocks.3.ffn.w*"]), cfg)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "encoder.blocks.3.ffn.w2" in frozen and "encoder.blocks.3.ffn.router" not in frozen
    assert all(n.startswith(("embed.", "encoder.blocks.0.", "encoder.blocks.3.ffn.w")) for n in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, load_pretrain_config(REPO / "jobs/configs/pretrain.yaml").optim)
    torch.manual_seed(2)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        out = model.encode("video", torch.rand(2, 2, 16, 16, 3))
        (model.classify(out.pooled, "digits").square().mean() + out.aux_loss).backward()
        optimizer.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in frozen)
    assert not torch.equal(after["encoder.blocks.1.attn.qkv.weight"], before["encoder.blocks.1.attn.qkv.weight"])


def test_a_resume_skips_init_from_but_freezes_the_same_parameters() -> None:
    """The loop passes ``resuming`` when Ray has a checkpoint: its weights come later, the source may be gone."""
    cfg = preset("tiny")
    model = fresh(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = init_model(model, ModelSpec(init_from="/no/such/source", freeze=["embed.*"]), cfg, resuming=True)
    assert plan is None
    assert_same(model.state_dict(), before, before)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("embed."))


@pytest.mark.parametrize("moe", [{"router": "top_k", "top_k": 4}, {"router": "expert_choice", "capacity_factor": 4.0}])
def test_an_upcycled_moe_computes_what_the_dense_model_did(tmp_path: Path, moe: dict) -> None:
    """Identical experts give ``sum_e gate_e * FFN(x)``: the dense output exactly when the gates sum to 1,
    i.e. when every token reaches every expert (top-k with k = E; Expert Choice with capacity factor E).
    The float sum over experts rounds differently from one FFN, so equal up to ~1 ulp, not bit for bit."""
    dense_cfg = preset("tiny", qk_norm=True)  # the MoE preset turns QK-norm on
    path, dense = export(tmp_path, dense_cfg)
    cfg = preset("tiny", moe=True)
    cfg.moe = cfg.moe.model_copy(update=moe)
    model = fresh(cfg)
    router = model.state_dict()["encoder.blocks.3.ffn.router"].clone()
    plan = init_model(model, ModelSpec(init_from=str(path), upcycle=True), cfg)
    assert plan.upcycled == ["encoder.blocks.2.ffn", "encoder.blocks.3.ffn"]
    state = model.state_dict()
    assert torch.equal(state["encoder.blocks.3.ffn.router"], router)  # fresh
    fc1 = dense.state_dict()["encoder.blocks.3.ffn.fc1.weight"]
    assert all(torch.equal(state["encoder.blocks.3.ffn.w1"][e], fc1.T) for e in range(4))
    x = torch.rand(CLIP)
    torch.testing.assert_close(model.eval().encode("video", x).pooled, dense.eval().encode("video", x).pooled,
                               atol=2e-6, rtol=1e-5)


def test_an_upcycled_top1_layer_is_the_dense_ffn_scaled_by_its_gate(tmp_path: Path) -> None:
    """With k = 1 each token reaches one (identical) expert, weighted by its router probability < 1:
    so the output is ``max_e p_e(x) * FFN(x)``, not ``FFN(x)``."""
    path, dense = export(tmp_path, preset("tiny", qk_norm=True))
    cfg = preset("tiny", moe=True)
    cfg.moe = cfg.moe.model_copy(update={"router": "top_k", "top_k": 1})
    model = fresh(cfg)
    init_model(model, ModelSpec(init_from=str(path), upcycle=True), cfg)
    h = torch.randn(2, 5, 96)
    sparse, dense_ffn = model.encoder.blocks[3].ffn, dense.encoder.blocks[3].ffn
    y, _ = sparse(h)
    gate = torch.softmax(h.reshape(-1, 96) @ sparse.router.T, dim=-1).max(dim=-1).values.view(2, 5, 1)
    torch.testing.assert_close(y, gate * dense_ffn(h), atol=1e-6, rtol=1e-5)
    assert (gate < 0.5).all()  # a fresh router: far from the dense output


def test_upcycling_needs_a_dense_source_without_biases_and_is_hinted(tmp_path: Path) -> None:
    cfg = preset("tiny", moe=True)
    with pytest.raises(ConfigError, match="model.upcycle: true starts experts"):
        init_model(fresh(cfg), ModelSpec(init_from=str(export(tmp_path, preset("tiny", qk_norm=True))[0])), cfg)
    moe_source, _ = export(tmp_path, cfg, name="moe")
    with pytest.raises(ConfigError, match="has no dense FFN where the model has experts"):
        init_model(fresh(cfg), ModelSpec(init_from=str(moe_source), upcycle=True), cfg)
    biased, _ = export(tmp_path, preset("tiny", qk_norm=True, bias=True), name="biased")
    with pytest.raises(ConfigError, match=r"encoder.blocks.2.ffn.fc1.bias.*experts have no biases"):
        init_model(fresh(preset("tiny", moe=True, bias=True)), ModelSpec(init_from=str(biased), upcycle=True),
                   preset("tiny", moe=True, bias=True))


def test_an_incomplete_run_checkpoint_is_refused(tmp_path: Path) -> None:
    path, _ = export(tmp_path, preset("tiny"))
    (path / TRAIN_STATE).write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"no {COMPLETE}: the checkpoint was not completely written"):
        read_model(str(path))
    sizes = {p.name: p.stat().st_size for p in path.iterdir()}
    (path / COMPLETE).write_text(json.dumps({"files": {**sizes, "model.safetensors": 1}, "ranks": []}))
    with pytest.raises(CheckpointError, match="model.safetensors has .* bytes, 1 written"):
        read_model(str(path))
    (path / COMPLETE).write_text(json.dumps({"files": sizes, "ranks": []}))
    assert read_model(str(path))[1] == preset("tiny")


def test_init_from_s3_reproduces_the_weights(tmp_path: Path, s3_server) -> None:
    import s3fs

    cfg = preset("tiny")
    path, source = export(tmp_path, cfg)
    s3fs.S3FileSystem(**s3_server["storage_options"]).put(str(path), "imp-test/exported", recursive=True)
    model = fresh(cfg)
    init_model(model, ModelSpec(init_from="s3://imp-test/exported"), cfg, s3_server["storage_options"])
    assert_same(model.state_dict(), source.state_dict(), source.state_dict())
    with pytest.raises(FileNotFoundError, match="s3://imp-test/missing not found"):
        read_model("s3://imp-test/missing", s3_server["storage_options"])


def test_the_shipped_finetune_recipe_fits_a_demo_checkpoint(tmp_path: Path) -> None:
    """jobs/configs/finetune.yaml against a model of jobs/configs/pretrain.yaml's architecture: its
    reinit and freeze patterns are exactly what that source needs (strict, every other key loaded)."""
    from imp_platform.train.tasks import resolve_model_config

    source_cfg = resolve_model_config(load_pretrain_config(REPO / "jobs/configs/pretrain.yaml"))
    path, source = export(tmp_path, source_cfg)
    cfg = load_pretrain_config(REPO / "jobs/configs/finetune.yaml", [f"model.init_from={path}", "run.steps=2"])
    model_cfg = resolve_model_config(cfg)
    model = fresh(model_cfg)
    plan = init_model(model, cfg.model, model_cfg)
    assert set(plan.fresh) == {"heads.classifiers.digits_ft.weight", "heads.classifiers.digits_ft.bias"}
    assert {k.split(".")[2] for k in plan.dropped} == {"video_cls", "image_cls", "audio_cls"}
    assert_same(model.state_dict(), source.state_dict(), plan.load)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.startswith("embed.") for n in frozen) and any(n.startswith("encoder.blocks.1.") for n in frozen)


@pytest.mark.slow
def test_a_finetune_run_starts_from_a_checkpoint_and_keeps_frozen_weights(trained_checkpoint, tiny_overrides) -> None:
    """The shipped recipe through the real pretrain path (1 Ray Train worker, 2 steps)."""
    from imp_platform.train.checkpoint import load_model
    from imp_platform.train.trainer import build_trainer

    settings = [s for s in tiny_overrides if not s.startswith("tasks.")]  # the demo's task names
    cfg = load_pretrain_config(REPO / "jobs/configs/finetune.yaml", [
        *settings, f"model.init_from={trained_checkpoint}", "run.name=ft", "run.steps=2", "run.num_workers=1",
        "eval.max_samples=16", "tasks.digits_ft.token_budget=384", "tasks.video_text.token_budget=768"])
    result = build_trainer(cfg).fit()
    assert result.error is None, result.error
    tuned, tuned_cfg = load_model(result.checkpoint.path)
    source, _ = load_model(trained_checkpoint)
    assert tuned_cfg.heads == {"digits_ft": 10}
    before, after = source.state_dict(), tuned.state_dict()
    frozen = [k for k in after if k.startswith(("embed.", "encoder.blocks.0.", "encoder.blocks.1."))]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert not torch.equal(after["encoder.blocks.3.attn.qkv.weight"], before["encoder.blocks.3.attn.qkv.weight"])
