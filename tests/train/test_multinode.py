"""Multi-node for real: a two-raylet ``ray.cluster_utils.Cluster`` preprocesses on both nodes and runs
the shipped IMP-MoE-B recipe (jobs/configs/imp_moe_b.yaml, sizes reduced: FSDP + expert parallel 2,
elastic ``run.num_workers: [2, 4]``) on workers spread over both; one node goes mid-run, the run
continues from its last checkpoint on the remaining node (DCP resharding 4 -> 2), and grows back to
four workers when the node returns.

The test owns its Ray: the shared local Ray of other tests is shut down first (later tests start a
fresh one), and the cluster is shut down afterwards whatever happens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

NODE_CPUS = 2  # logical CPUs per node; one per train worker, so four workers need both nodes


def _lines(path: Path) -> list[str]:
    return path.read_text().split("\n")[:-1] if path.exists() else []


def _wait(what: str, condition: Callable[[], bool], timeout: float, failed: Callable[[], bool]) -> None:
    """Poll ``condition`` until true; fail naming ``what`` at the deadline or when the run ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert not failed(), f"the run ended before: {what}"
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for: {what}"
        time.sleep(0.2)


@pytest.fixture
def two_nodes(monkeypatch) -> Iterator[object]:
    """A head and one worker raylet with 2 logical CPUs each, this process connected; shut down after."""
    import ray
    from ray.cluster_utils import Cluster

    # A worker group whose placement group waits for a node that is gone gives up after this long
    # (Ray's default 60 s) and the controller decides again on what the cluster holds now.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
    ray.shutdown()
    for attempt in range(3):  # a raylet that misses Ray's start-up deadlines on a loaded box: start again
        cluster = Cluster(initialize_head=False, connect=False)
        try:
            cluster.add_node(num_cpus=NODE_CPUS, include_dashboard=True, dashboard_port=0)  # State API: placements
            cluster.add_node(num_cpus=NODE_CPUS)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": str(REPO / "platform")}})
            break
        except Exception:  # Ray raises a bare Exception for its start-up timeouts
            ray.shutdown()
            cluster.shutdown()
            if attempt == 2:
                raise
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _ran_on(address: str, names: tuple[str, ...]) -> set[str]:
    """The nodes on which tasks or actors whose name contains one of ``names`` ran (State API of ``address``)."""
    from ray.util.state import list_actors, list_tasks

    items = [*list_tasks(address=address, detail=True, limit=10_000, raise_on_missing_output=False),
             *list_actors(address=address, detail=True, limit=10_000, raise_on_missing_output=False)]
    return {item.node_id for item in items
            if item.node_id and any(n in (getattr(item, "name", None) or getattr(item, "class_name", "")) for n in names)}


def _worker_nodes(address: str) -> dict[int, str]:
    """pid -> node id of every Ray Train worker actor of the run, alive or dead."""
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000,
                         raise_on_missing_output=False)
    return {a.pid: a.node_id for a in actors if a.pid}


def reduced_recipe(root: Path, storage: Path, debug: Path, steps: int) -> list[str]:
    """jobs/configs/imp_moe_b.yaml with only its sizes reduced (tiny widths, 4 experts, expert parallel
    2, 2-4 CPU workers, small batches) and moving digits in place of WebVid."""
    return [
        f"data.root={root}", f"data.pipeline={REPO / 'pipelines/moving_digits.yaml'}", "data.tokenizer=null",
        "model.overrides={d_model: 96, depth: 4, num_heads: 4, mlp_dim: 384, d_common: 128, vocab_size: 1024, "
        "max_text_len: 64, video_patch: [2, 8, 8], max_positions: [8, 16, 16], moe.num_experts: 4, moe.last_n: 2}",
        *[f"tasks.{t}.{k}={v}" for t in ("video_text", "video_audio", "audio_text")
          for k, v in (("token_budget", 768), ("global_token_budget", 3072))],
        "parallel.expert=2", "run.use_gpu=false", "run.num_workers=[2, 4]", "run.cpus_per_worker=1",
        "run.threads_per_worker=1", "run.elastic_resize_every=2s", f"run.steps={steps}", "run.log_every=2",
        "run.checkpoint_every=2", f"run.eval_every={steps}", "run.max_failures=4", "run.tensorboard=false",
        f"run.storage_path={storage}", "run.name=elastic", "schedule.warmup_steps=2",
        "eval.max_samples=8", "eval.batch_size=8", "eval.report=false",
        f"run.worker_env={{IMP_TRAIN_DEBUG_DIR: {debug}}}",
    ]


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.long  # ~2.5 min on the quiet 2-core machine: `make chaos`, not `make test`
def test_elastic_sharded_run_over_two_nodes_survives_losing_one_and_grows_back(synth_shards, two_nodes, tmp_path):
    import ray

    from imp_platform.config.train import load_pretrain_config
    from imp_platform.train.trainer import build_trainer, prepare_data

    cluster = two_nodes
    head = ray.get_runtime_context().get_node_id()
    # Both splits are preprocessed here, on the cluster (no local Ray of the session is needed).
    root = tmp_path / "data"
    root.mkdir()
    (root / "raw").symlink_to(synth_shards["root"], target_is_directory=True)
    debug = tmp_path / "debug"
    steps = 30
    cfg = load_pretrain_config(REPO / "jobs/configs/imp_moe_b.yaml",
                               reduced_recipe(root, tmp_path / "ray", debug, steps))
    marks = {"start": time.monotonic()}

    # Preprocessing (Ray Data) on the cluster: its read, decode (tasks or actors) and write use both nodes' CPUs.
    assert prepare_data(cfg)
    assert len(_ran_on(cluster.address, ("ReadTarShards", "DecodeBatches", "decode_batch", "Write"))) == 2
    marks["preprocessed"] = time.monotonic()

    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", build_trainer(cfg).fit()), daemon=True)
    thread.start()
    ended = lambda: not thread.is_alive()  # noqa: E731
    snapshot = tmp_path / "ray" / "elastic" / "checkpoint_manager_snapshot.json"
    starts = lambda rank: [int(s) for s in _lines(debug / f"rank{rank}-starts")]  # noqa: E731

    # Four workers over both nodes. Once a checkpoint is registered and training went past it, the
    # second node goes away with its two workers.
    _wait("4 workers past a registered checkpoint", lambda: snapshot.exists() and "checkpoint_" in snapshot.read_text()
          and len(_lines(debug / "rank3-grads")) > 2, 240, ended)
    marks["4 workers"] = time.monotonic()
    nodes = _worker_nodes(cluster.address)
    first = [nodes[int(_lines(debug / f"rank{r}-pids")[0])] for r in range(4)]
    assert head in first and len(set(first)) == 2, f"the four workers did not spread over both nodes: {first}"
    cluster.remove_node(cluster.list_all_nodes()[1])

    # The run continues on the head's two workers from its last checkpoint, resharded 4 -> 2.
    _wait("a restart on 2 workers", lambda: len(starts(0)) >= 2, 240, ended)
    marks["2 workers"] = time.monotonic()
    assert starts(0)[1] > 0 and starts(2) == [0], "the restart did not resume from a checkpoint on 2 workers"
    nodes = _worker_nodes(cluster.address)
    assert {nodes[int(_lines(debug / f"rank{r}-pids")[-1])] for r in range(2)} == {head}

    # The node returns: the elastic policy grows the run back to four workers, from a later checkpoint.
    cluster.add_node(num_cpus=NODE_CPUS)
    _wait("a restart on 4 workers", lambda: len(starts(3)) >= 2, 240, ended)
    marks["4 workers again"] = time.monotonic()
    assert starts(3)[1] >= starts(0)[1]

    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish"
    marks["finished"] = time.monotonic()
    result = outcome["result"]
    assert result.error is None, result.error
    assert result.metrics["step"] == steps
    nodes = _worker_nodes(cluster.address)
    last = {nodes[int(_lines(debug / f"rank{r}-pids")[-1])] for r in range(4)}
    assert len(last) == 2, "the grown-back workers do not use the returned node"
    print({name: round(t - marks["start"], 1) for name, t in marks.items()})


@pytest.mark.slow
def test_the_prod_recipe_trains_with_only_sizes_reduced(ray_local, processed_root, tmp_path):
    """What `make test` runs of jobs/configs/imp_moe_b.yaml (the two-node run above is in `make chaos`):
    FSDP + expert parallel 2 on two gloo workers of the shared local Ray, to a sharded checkpoint."""
    from imp_platform.config.train import load_pretrain_config
    from imp_platform.train.trainer import build_trainer

    cfg = load_pretrain_config(REPO / "jobs/configs/imp_moe_b.yaml", [
        *reduced_recipe(processed_root, tmp_path / "ray", tmp_path / "debug", steps=4), "run.num_workers=2"])
    assert (cfg.parallel.data, cfg.parallel.expert, cfg.run.num_workers) == ("fsdp", 2, 2)
    result = build_trainer(cfg).fit()
    assert result.error is None, result.error
    assert result.metrics["step"] == 4
    assert (Path(result.checkpoint.path) / "dcp").is_dir()


@pytest.mark.parametrize("value, message", [
    ("[4, 2]", "run.num_workers: Value error, an elastic range [min, max] needs 1 <= min <= max, got [4, 2]"),
    ("[0, 2]", "needs 1 <= min <= max, got [0, 2]"),
    ("-1", "run.num_workers: Value error, a worker count must be >= 0, got -1"),
])
def test_a_bad_worker_range_is_a_config_error_naming_the_key(value: str, message: str) -> None:
    from imp_platform.config import ConfigError
    from imp_platform.config.train import load_pretrain_config

    with pytest.raises(ConfigError) as err:
        load_pretrain_config(REPO / "jobs/configs/pretrain.yaml", [f"run.num_workers={value}"])
    assert message in str(err.value)


def test_an_elastic_range_maps_onto_ray_train_and_must_suit_expert_parallelism() -> None:
    from imp_platform.config import ConfigError
    from imp_platform.config.train import load_pretrain_config
    from imp_platform.train.trainer import build_trainer

    cfg = load_pretrain_config(REPO / "jobs/configs/pretrain.yaml", [
        "run.num_workers=[2, 4]", "run.elastic_resize_every=90s", "parallel.expert=2"])
    assert (cfg.run.elastic, cfg.run.min_workers, cfg.run.max_workers) == (True, 2, 4)
    scaling = build_trainer(cfg).scaling_config
    assert scaling.elasticity_enabled and (scaling.min_workers, scaling.max_workers) == (2, 4)
    assert scaling.elastic_resize_monitor_interval_s == 90.0
    with pytest.raises(ConfigError, match=r"run.num_workers: both ends of the elastic range \[1, 4\] must be "
                                          r"multiples of parallel.expert=2"):
        load_pretrain_config(REPO / "jobs/configs/pretrain.yaml", ["run.num_workers=[1, 4]", "parallel.expert=2"])
