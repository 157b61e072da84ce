"""RayJob entrypoints, base and every overlay: they name scripts and configs that exist, survive the
KubeRay submitter's shell, pass their own config validation, fit the cluster, and agree with each
other on where data lives (preprocess output = pretrain input)."""

from __future__ import annotations

import pytest
from infra_manifests import (
    REPO,
    entrypoint_argv,
    gpu_capacity,
    of_kind,
    option_value,
    option_values,
    rendered,
    set_value,
    the_cluster,
    variants,
)

VARIANTS = list(variants())
# KubeRay splices the entrypoint unquoted into `bash -c "... ray job submit ... -- ENTRYPOINT ; ..."`
# in the submitter pod: any of these would be interpreted there, not by the job.
SHELL_SYNTAX = set(";&|$`<>(){}[]*?!~#'\"\\\n")
SCRIPTS = {"preprocess": "jobs/preprocess.py", "pretrain": "jobs/pretrain.py", "tune": "jobs/tune.py"}
PROD_GPU_MEM_GB = 80  # the prod GPU pods' GPUs (infra/kuberay/overlays/prod: 8 x 80 GiB per pod)


def _jobs(variant: str, component: str) -> list[dict]:
    return [job for job in of_kind(rendered(variant), "RayJob")
            if job["metadata"]["labels"]["app.kubernetes.io/component"] == component]


def _job(variant: str, component: str) -> dict:
    (job,) = _jobs(variant, component)
    return job


@pytest.mark.parametrize("variant", VARIANTS)
def test_entrypoints_name_existing_scripts_and_configs(variant):
    for job in of_kind(rendered(variant), "RayJob"):
        name, argv = job["metadata"]["name"], entrypoint_argv(job)
        component = job["metadata"]["labels"]["app.kubernetes.io/component"]
        assert argv[:2] == ["python", SCRIPTS[component]], f"{name}: {argv[:2]}"
        files = [arg for arg in argv[1:] if arg.endswith((".py", ".yaml", ".yml")) and "=" not in arg]
        assert len(files) >= 2, f"{name}: names no config"
        for path in files:
            assert (REPO / path).is_file(), f"{name}: {path} does not exist in the repository"


@pytest.mark.parametrize("variant", VARIANTS)
def test_entrypoints_have_no_shell_syntax(variant):
    for job in of_kind(rendered(variant), "RayJob"):
        found = SHELL_SYNTAX & set(job["spec"]["entrypoint"])
        assert not found, f"{job['metadata']['name']}: {sorted(found)} would be run by the submitter's shell"


@pytest.mark.parametrize("variant", VARIANTS)
def test_pretrain_entrypoint_is_a_valid_gpu_run_that_fits_the_cluster(variant):
    from imp_platform.config.train import load_pretrain_config

    argv = entrypoint_argv(_job(variant, "pretrain"))
    cfg = load_pretrain_config(REPO / option_value(argv, "--config"), option_values(argv, "--set"))
    assert cfg.run.use_gpu and cfg.data.synth is None
    assert cfg.run.storage_path.startswith("s3://") and cfg.data.root.startswith("s3://"), \
        "checkpoints and data must outlive the ephemeral cluster"
    capacity = gpu_capacity(the_cluster(rendered(variant))["spec"])
    assert 1 <= cfg.run.min_workers <= cfg.run.max_workers <= capacity, \
        f"{cfg.run.num_workers} GPU workers never fit {capacity} GPUs: the job would wait forever"


def test_prod_trains_imp_moe_b_that_fits_its_gpus():
    """prod runs the real IMP-MoE-B recipe (the B preset with its 16 experts, FSDP + expert parallel), and
    `platform model plan` says a micro-batch of its largest token budget fits the prod GPUs at the most
    workers the run uses."""
    from typer.testing import CliRunner

    from imp_platform.cli import app
    from imp_platform.config.train import load_pretrain_config

    argv = entrypoint_argv(_job("prod", "pretrain"))
    assert option_value(argv, "--config") == "jobs/configs/imp_moe_b.yaml"
    cfg = load_pretrain_config(REPO / option_value(argv, "--config"), option_values(argv, "--set"))
    assert (cfg.model.preset, cfg.model.moe, cfg.model.overrides) == ("base", True, {})
    assert cfg.parallel.data == "fsdp" and cfg.parallel.expert > 1 and cfg.run.elastic
    assert all(task.global_token_budget for task in cfg.tasks.values()), "the recipe is its global batch"
    tokens = max(task.token_budget for task in cfg.tasks.values())
    args = ["model", "plan", "--preset", "base", "--moe", "--gpus", str(cfg.run.max_workers),
            "--gpu-mem-gb", str(PROD_GPU_MEM_GB), "--expert", str(cfg.parallel.expert),
            "--tokens-per-gpu", str(tokens), "--parallel", "fsdp+ep"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"fits (under 90% of {PROD_GPU_MEM_GB} GiB): fsdp+ep" in result.output


@pytest.mark.parametrize("variant", VARIANTS)
def test_preprocess_writes_where_pretrain_reads(variant):
    from imp_platform.config.train import load_pretrain_config
    from imp_platform.data.pipeline import load_preprocess_config

    argv = entrypoint_argv(_job(variant, "pretrain"))
    cfg = load_pretrain_config(REPO / option_value(argv, "--config"), option_values(argv, "--set"))
    outputs, inputs = set(), set()
    for job in _jobs(variant, "preprocess"):
        pre = entrypoint_argv(job)
        pipeline = load_preprocess_config(REPO / pre[2], option_value(pre, "--input"), option_value(pre, "--output"),
                                          option_values(pre, "--set"))
        outputs.add(pipeline.output.path)
        inputs.update(pipeline.source.paths)
    assert outputs == {cfg.data.processed_path(cfg.data.train_split), cfg.data.processed_path(cfg.data.eval_split)}
    assert all(path.startswith(cfg.data.raw_root + "/") for path in inputs), (inputs, cfg.data.raw_root)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tune_entrypoint_is_a_valid_sweep_that_fits_the_cluster(variant):
    from imp_platform.config.base import load_config
    from imp_platform.config.tune import SweepConfig

    argv = entrypoint_argv(_job(variant, "tune"))
    sweep = load_config(SweepConfig, REPO / option_value(argv, "--space"), option_values(argv, "--set"))
    assert sweep.storage_path.startswith("s3://"), "trial results must outlive the ephemeral cluster"
    assert sweep.resources.use_gpu
    assert sweep.resources.workers <= gpu_capacity(the_cluster(rendered(variant))["spec"])
    assert set_value(argv, "storage_path") == sweep.storage_path
