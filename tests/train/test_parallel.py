"""``parallel:`` without Ray: FSDP2 on 2 gloo processes gives the replicated path's gradients and
updates, gradient accumulation on 1 process equals 2 workers, activation checkpointing and
compile leave gradients unchanged, DCP checkpoints reshard 2 -> 1 -> 2 workers and
consolidate into the exported weights, checkpoints resume across layouts (replicate <-> FSDP,
FSDP + expert parallel) and asynchronous ones hold their step's state; one Ray Train run on s3://."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from imp_platform.config import validate
from imp_platform.config.train import ParallelConfig, PretrainConfig
from imp_platform.train.agd import Choice
from imp_platform.train.loop import forward_backward, micro_batching
from imp_platform.train.parallel import apply_parallelism, full_state_dict

ROWS = 4  # per rank
CLS = Choice("cls", "b")
NCE = Choice("vt", "b")


def _cfg() -> PretrainConfig:
    return validate(PretrainConfig, {"model": {"preset": "tiny", "moe": True}, "tasks": {
        "cls": {"modalities": ["video"], "objectives": [{"kind": "classification"}], "num_classes": 5},
        "vt": {"modalities": ["video", "text"], "objectives": [{"kind": "nce"}]}}})


def _model(cfg: PretrainConfig) -> torch.nn.Module:
    from imp_platform.model import build_model
    from imp_platform.train.tasks import resolve_model_config

    torch.manual_seed(0)
    return build_model(resolve_model_config(cfg))


def _batch(part: int) -> dict[str, np.ndarray]:
    """Rows ``part * ROWS ...`` of a fixed global batch (rank ``part``'s share, or micro-batch ``part``)."""
    rng = np.random.default_rng(part)
    return {"video": rng.integers(0, 255, (ROWS, 4, 32, 48, 3), dtype=np.uint8),
            "text_ids": rng.integers(1, 100, (ROWS, 7)), "text_mask": np.ones((ROWS, 7), dtype=bool),
            "label": rng.integers(0, 5, ROWS)}


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for n, p in model.named_parameters() if p.grad is not None}


def _step(model, cfg, choices, batches, parallel: ParallelConfig | None = None) -> dict[str, torch.Tensor]:
    """Grads of one optimizer step of ``model`` laid out as ``parallel`` says (then the step is taken)."""
    from imp_platform.train.optim import build_optimizer

    plan = apply_parallelism(model, parallel or ParallelConfig(), torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.optim)
    optimizer.zero_grad(set_to_none=True)
    forward_backward(model, cfg, choices, batches, torch.device("cpu"), plan)
    grads = _grads(model)
    optimizer.step()
    return grads


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(fn, world: int, *args) -> None:
    mp.spawn(_init_and_run, args=(world, _free_port(), fn, args), nprocs=world, join=True)


def _init_and_run(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _replicate_vs_fsdp(rank: int, out: str) -> None:
    """One AGD step of each task on both layouts from the same weights and batches; what each gave."""
    cfg = _cfg()
    fsdp_cfg = ParallelConfig(data="fsdp")
    results = {}
    for name, choice in (("cls", CLS), ("vt", NCE)):
        replica, sharded = _model(cfg), _model(cfg)
        results[f"{name}/replicate"] = _step(replica, cfg, [choice], [[_batch(rank)]])
        results[f"{name}/fsdp"] = _step(sharded, cfg, [choice], [[_batch(rank)]], fsdp_cfg)
        results[f"{name}/replicate_after"] = dict(replica.state_dict())
        results[f"{name}/fsdp_after"] = full_state_dict(sharded)
    for layout in ("replicate", "fsdp"):  # experts split over the two ranks
        model = _model(cfg)
        results[f"cls/{layout}+ep"] = _step(model, cfg, [CLS], [[_batch(rank)]], ParallelConfig(data=layout, expert=2))
        results[f"cls/{layout}+ep_after"] = full_state_dict(model)
    if rank == 0:
        torch.save(results, Path(out) / "results.pt")


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("parallel")
    _spawn(_replicate_vs_fsdp, 2, str(out))
    return torch.load(out / "results.pt", weights_only=True)


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("task", ["cls", "vt"])
def test_fsdp_gives_the_replicated_gradients_and_update(two_workers, task: str) -> None:
    grads = two_workers[f"{task}/replicate"]
    # Only the task's own input and output layers got gradients (the other task's head did not).
    head = "heads.classifiers.cls.weight"
    assert (head in grads) == (task == "cls") and any(n.startswith("encoder.blocks.0.") for n in grads)
    _assert_close(two_workers[f"{task}/fsdp"], grads)
    _assert_close(two_workers[f"{task}/fsdp_after"], two_workers[f"{task}/replicate_after"])


@pytest.mark.parametrize("layout", ["replicate", "fsdp"])
def test_expert_parallel_gives_the_replicated_gradients_and_update(two_workers, layout: str) -> None:
    _assert_close(two_workers[f"cls/{layout}+ep"], two_workers["cls/replicate"])
    _assert_close(two_workers[f"cls/{layout}+ep_after"], two_workers["cls/replicate_after"])


def test_accumulating_two_micro_batches_equals_two_workers(two_workers, one_torch_thread) -> None:
    """The same global batch: 2 workers x 1 micro-batch each, or 1 worker x 2 micro-batches."""
    cfg = _cfg()
    grads = _step(_model(cfg), cfg, [CLS], [[_batch(0), _batch(1)]])
    _assert_close(grads, two_workers["cls/replicate"])


def test_micro_batches_follow_the_worker_count_for_one_global_budget() -> None:
    task = _cfg().tasks["cls"].model_copy(update={"token_budget": 2048, "global_token_budget": 8192})
    plans = {world: micro_batching(64, task, rows=1000, world_size=world) for world in (1, 2, 4, 8)}
    assert plans == {1: (32, 4), 2: (32, 2), 4: (32, 1), 8: (16, 1)}
    assert all(world * batch * accum == 128 for world, (batch, accum) in plans.items())
    per_worker = task.model_copy(update={"global_token_budget": None})
    assert micro_batching(64, per_worker, rows=1000, world_size=4) == (32, 1)


@pytest.mark.parametrize(("override", "field"), [("parallel.data=zero", "parallel.data"),
                                                ("parallel.expert=0", "parallel.expert"),
                                                ("tasks.video_cls.global_token_budget=-1", "global_token_budget"),
                                                ("parallel.async_checkpoint=true", "async_checkpoint")])
def test_bad_parallel_settings_name_the_field(override: str, field: str) -> None:
    from imp_platform.config import ConfigError
    from imp_platform.config.train import load_pretrain_config

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_pretrain_config(None, [override])


@pytest.mark.parametrize("setting", [{"activation_checkpointing": "block"}, {"activation_checkpointing": "moe_only"},
                                     pytest.param({"compile": True}, marks=pytest.mark.slow)])
def test_checkpointing_and_compile_leave_gradients_unchanged(setting, one_torch_thread) -> None:
    cfg = _cfg()
    want = _step(_model(cfg), cfg, [NCE], [[_batch(0)]])
    model = _model(cfg)
    _assert_close(_step(model, cfg, [NCE], [[_batch(0)]], ParallelConfig(**setting)), want)
    assert set(model.state_dict()) == set(_model(cfg).state_dict())  # checkpoint names unchanged


# --- DCP checkpoints --------------------------------------------------------------------------

def _train_or_resume(rank: int, world: int, root: str, resume_from: str | None,
                     parallel: ParallelConfig = ParallelConfig(data="fsdp"), asynchronous: bool = False) -> None:
    """``parallel``'s layout on ``world`` ranks: resume from ``resume_from`` (a checkpoint of any
    layout) if given, else one step; save into ``root/rank<r>`` (as each Ray worker does), with the
    full weights and optimizer state beside (``root/full.pt``). ``asynchronous``: the shards are
    written in the background while one more step changes the weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from imp_platform.train import checkpoint as ckpt
    from imp_platform.train.optim import build_optimizer
    from imp_platform.train.tasks import resolve_model_config

    cfg = _cfg()
    model = _model(cfg)
    plan = apply_parallelism(model, parallel, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.optim)
    if resume_from:
        ckpt.load_training_state(resume_from, ckpt.load_train_state(resume_from), model, optimizer)
    else:
        forward_backward(model, cfg, [CLS], [[_batch(rank)]], torch.device("cpu"), plan)
        optimizer.step()
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    weights = full_state_dict(model)
    if rank == 0:
        Path(root).mkdir(parents=True, exist_ok=True)
        torch.save({"model": weights, "optim": optim["state"]}, Path(root) / "full.pt")
    train_state = {"step": 1} if plan.sharded else {"step": 1, "optimizer": optimizer.state_dict()}
    group = ckpt.async_checkpoint_group() if asynchronous else None
    pending = ckpt.start_checkpoint(
        Path(root) / f"rank{rank}", rank=rank, world_size=world, rank_state={"rank": rank}, model=model,
        model_cfg=resolve_model_config(cfg), cfg=cfg, train_state=train_state,
        optimizer=optimizer if plan.sharded else None, async_group=group)
    if asynchronous:
        forward_backward(model, cfg, [NCE], [[_batch(rank)]], torch.device("cpu"), plan)
        optimizer.step()
    pending.finish()


def _merged(root: Path) -> Path:
    """The rank directories copied into one, as Ray Train persists every rank's checkpoint files."""
    merged = root / "merged"
    for rank_dir in sorted(root.glob("rank*")):
        shutil.copytree(rank_dir, merged, dirs_exist_ok=True)
    return merged


def _assert_same_state(got: dict[str, dict], want: dict[str, dict]) -> None:
    """Same weights, and optimizer state (AdamW step and moments) for exactly the same parameters."""
    _assert_close(got["model"], want["model"])
    assert got["optim"].keys() == want["optim"].keys()
    for name, state in want["optim"].items():
        _assert_close(got["optim"][name], state)


def _across_layouts(rank: int, root: str) -> None:
    """Replicated on 2 ranks -> resumed by FSDP and by FSDP + expert parallel 2; FSDP's checkpoint
    of that -> resumed replicated on 2 ranks; an FSDP checkpoint written asynchronously -> resumed
    (every run records its full state in ``root/<name>``)."""
    runs = {"replicate": (None, ParallelConfig()),
            "fsdp": ("replicate", ParallelConfig(data="fsdp")),
            "fsdp_ep": ("replicate", ParallelConfig(data="fsdp", expert=2)),
            "replicate_again": ("fsdp", ParallelConfig()),
            "async": (None, ParallelConfig(data="fsdp")),
            "async_resumed": ("async", ParallelConfig(data="fsdp"))}
    for name, (source, parallel) in runs.items():
        resume_from = str(Path(root) / source / "merged") if source else None
        _train_or_resume(rank, 2, str(Path(root) / name), resume_from, parallel, asynchronous=name == "async")
        dist.barrier()
        if rank == 0:
            _merged(Path(root) / name)
        dist.barrier()


@pytest.mark.slow
def test_sharded_checkpoints_reshard_and_consolidate_into_the_export(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from imp_platform.model.io import WEIGHTS, save_pretrained
    from imp_platform.train import checkpoint as ckpt

    runs = {}
    previous = None
    for name, world in (("two", 2), ("one", 1), ("two_again", 2)):
        root = tmp_path / name
        _spawn(_train_or_resume, world, world, str(root), previous)
        previous = str(_merged(root))
        ckpt.verify_complete(previous)
        runs[name] = torch.load(root / "full.pt", weights_only=True)
    # Resumed on 1 worker, then on 2 again: the same weights and optimizer state as saved on 2.
    for name in ("one", "two_again"):
        _assert_same_state(runs[name], runs["two"])
    # The consolidated shards (one process, no process group) are the model; exported, the same.
    assert ckpt.is_sharded(previous) and not (Path(previous) / WEIGHTS).exists()
    model, model_cfg = ckpt.load_model(previous)
    _assert_close(model.state_dict(), runs["two"]["model"])
    save_pretrained(model, model_cfg, tmp_path / "export")
    _assert_close(load_file(str(tmp_path / "export" / WEIGHTS)), runs["two"]["model"])
    # A rank's shard cut short is refused like any other half-written file.
    shard = next(Path(previous, ckpt.SHARDS).glob("__1_*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=r"dcp/__1_0\.distcp has 100 bytes"):
        ckpt.verify_complete(previous)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layouts")
    _spawn(_across_layouts, 2, str(root))
    return root


def test_checkpoints_resume_across_layouts(layouts: Path, one_torch_thread) -> None:
    from imp_platform.train import checkpoint as ckpt

    _train_or_resume(0, 1, str(layouts / "replicate_one"), str(layouts / "fsdp" / "merged"), ParallelConfig())
    runs = {name: torch.load(layouts / name / "full.pt", weights_only=True)
            for name in ("replicate", "fsdp", "fsdp_ep", "replicate_again", "replicate_one")}
    assert ckpt.is_sharded(layouts / "fsdp" / "merged") and not ckpt.is_sharded(layouts / "replicate" / "merged")
    # Only the stepped task's parameters have optimizer state: the others must stay without one.
    assert 0 < len(runs["replicate"]["optim"]) < len(runs["replicate"]["model"])
    for name in ("fsdp", "fsdp_ep", "replicate_again", "replicate_one"):
        _assert_same_state(runs[name], runs["replicate"])


def test_optimizer_state_of_another_model_is_refused_naming_the_file(tmp_path: Path, one_torch_thread) -> None:
    from imp_platform.model.io import save_pretrained
    from imp_platform.train import checkpoint as ckpt
    from imp_platform.train.optim import build_optimizer
    from imp_platform.train.tasks import resolve_model_config

    cfg = _cfg()
    model = _model(cfg)
    save_pretrained(model, resolve_model_config(cfg), tmp_path)
    one_group = torch.optim.AdamW(model.parameters()).state_dict()  # not build_optimizer's two groups
    with pytest.raises(ckpt.CheckpointError, match=r"train_state\.pt: optimizer param groups of sizes \[\d+\]"):
        ckpt.load_replicated(tmp_path, one_group, model, build_optimizer(model, cfg.optim))


def test_an_async_checkpoint_holds_the_state_of_its_step(layouts: Path) -> None:
    """The step taken while the shards were written is not in them; the files are complete."""
    from imp_platform.train import checkpoint as ckpt

    merged = layouts / "async" / "merged"
    ckpt.verify_complete(merged)
    listed = {name for saved in ckpt.load_rank_states(merged) for name in saved["files"]}
    assert listed == {f"{ckpt.SHARDS}/{p.name}" for p in (merged / ckpt.SHARDS).iterdir()}  # sizes checked on load
    runs = {name: torch.load(layouts / name / "full.pt", weights_only=True) for name in ("async", "async_resumed")}
    _assert_same_state(runs["async_resumed"], runs["async"])


@pytest.mark.slow
def test_a_ray_train_fsdp_run_on_two_workers_resumes_on_one(ray_local, tiny_overrides, s3_server,
                                                            tmp_path: Path) -> None:
    """Through s3:// (moto), with the shards written asynchronously: checkpoints 2 and 4 are
    complete in the bucket, the one of step 2 reported although step 4's write was started after it."""
    import json

    from imp_platform.config.train import load_pretrain_config
    from imp_platform.train import checkpoint as ckpt
    from imp_platform.train.trainer import build_trainer

    debug = tmp_path / "debug"
    run_dir = f"s3://{s3_server['bucket']}/{tmp_path.name}"
    settings = [*tiny_overrides, "parallel.data=fsdp", "parallel.async_checkpoint=true", "run.name=fsdp",
                "run.eval_every=4", "run.checkpoint_every=2", f"run.storage_path={run_dir}",
                f"run.storage_options={json.dumps(s3_server['storage_options'])}",
                f"run.worker_env={{IMP_TRAIN_DEBUG_DIR: {debug}}}"]
    repo = Path(__file__).resolve().parents[2]
    first = build_trainer(load_pretrain_config(repo / "jobs/configs/pretrain.yaml",
                                               [*settings, "run.steps=4", "run.num_workers=2"])).fit()
    assert first.error is None and first.metrics["step"] == 4
    assert 0.0 <= first.metrics["zeroshot_video_top1"] <= 1.0  # eval ran on the gathered weights
    assert first.checkpoint.path.endswith("fsdp/checkpoint_0000004")
    for step in (2, 4):
        with ckpt.ray_checkpoint(f"{run_dir}/fsdp/checkpoint_{step:07d}",
                                 s3_server["storage_options"]).as_directory() as directory:
            ckpt.verify_complete(directory)
            assert ckpt.is_sharded(directory) and len(list(Path(directory, ckpt.SHARDS).glob("*.distcp"))) == 2
            if step == 4:
                model, _ = ckpt.load_model(directory)  # consolidated for eval and export
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    second = build_trainer(load_pretrain_config(repo / "jobs/configs/pretrain.yaml",
                                                [*settings, "run.steps=6", "run.num_workers=1"])).fit()
    assert second.error is None and second.metrics["step"] == 6
    assert (debug / "rank0-starts").read_text().split() == ["0", "4"]
    assert (debug / "rank1-starts").read_text().split() == ["0"]  # the resume ran on one worker
    restored = (debug / "rank0-restores").read_text().split()
    assert restored[:2] == ["fsdp", "4"] and restored[2].endswith("fsdp/checkpoint_0000004")
