"""``platform bench train``: IMP's two ablations at small scale, on the demo data, at equal steps.

(a) AGD (one task per step) vs ``mixed`` (every task in one step, losses summed), both MoE;
(b) MoE vs dense at equal parameters per token (Expert Choice with capacity 1.0 sends each
token through one expert on average, so the tiny dense and tiny MoE presets match per token).
Each arm is a real Ray Train run of the embedded config; we report training tokens/s (over the
whole run), wall time and held-out zero-shot accuracy, with ratios against the AGD+MoE arm, and
each worker's memory: ``worker_pss_growth`` is the worst worker's PSS at the end of the run over
its PSS at 10% of the run (the loop logs every rank's PSS with each metrics row).

``cpu_mfu`` (bench/mfu.py): the demo recipe's training FLOP/s, counted from the model's shapes,
over fp32 GEMM FLOP/s at the same thread count, for the tiny (demo) and small presets.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from imp_platform.bench.common import ratio, write_results

log = logging.getLogger(__name__)

ARMS: dict[str, list[str]] = {
    "agd_moe": ["agd.mode=random", "model.moe=true"],
    "mixed_moe": ["agd.mode=mixed", "model.moe=true"],
    "agd_dense": ["agd.mode=random", "model.moe=false"],
}
MFU_PRESETS = ("tiny", "small")
KEYS = ("zeroshot_video_top1", "zeroshot_audio_top1", "zeroshot_image_top1", "retrieval_video_text_r1", "val_loss")


def _arm(name: str, overrides: list[str], storage: str) -> dict[str, Any]:
    from imp_platform.config.train import load_pretrain_config
    from imp_platform.model.presets import count_params
    from imp_platform.train.checkpoint import load_history
    from imp_platform.train.tasks import resolve_model_config
    from imp_platform.train.trainer import build_trainer, ensure_ray, prepare_data

    cfg = load_pretrain_config(None, [*overrides, f"run.name=bench-{name}", f"run.storage_path={storage}",
                                      "run.tensorboard=false"])
    ensure_ray(cfg)
    prepare_data(cfg)
    began = time.perf_counter()
    result = build_trainer(cfg).fit()
    wall = time.perf_counter() - began
    with result.checkpoint.as_directory() as directory:
        history = load_history(directory)
    rows = [r for r in history if "tokens_per_s" in r]
    params = count_params(resolve_model_config(cfg))
    return {
        **worker_memory(history, cfg.run.steps),
        "overrides": overrides,
        "steps": cfg.run.steps,
        "wall_s": round(wall, 1),
        "tokens_per_s": round(sum(r["tokens_per_s"] for r in rows) / max(len(rows), 1), 1),
        "params_total": params["total"],
        "params_per_token": params["per_token"],
        **{k: result.metrics.get(k) for k in KEYS},
    }


def run(quick: bool, out: Path) -> dict[str, Any]:
    """Run the three arms (quick: fewer steps and held-out samples) and write the JSON + a table."""
    # quick: 200 steps still cross the demo curriculum's switch to all tasks (step 100)
    common = ["run.steps=200", "run.eval_every=200", "eval.max_samples=150"] if quick else []
    arms: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="imp-bench-train-") as storage:
        for name, overrides in ARMS.items():
            log.info("bench train: arm %s", name)
            arms[name] = _arm(name, [*common, *overrides], storage)
    base = arms["agd_moe"]
    ratios = {
        "agd_vs_mixed_tokens_per_s": ratio(base["tokens_per_s"], arms["mixed_moe"]["tokens_per_s"]),
        "agd_vs_mixed_video_top1": ratio(base["zeroshot_video_top1"], arms["mixed_moe"]["zeroshot_video_top1"]),
        "moe_vs_dense_tokens_per_s": ratio(base["tokens_per_s"], arms["agd_dense"]["tokens_per_s"]),
        "moe_vs_dense_video_top1": ratio(base["zeroshot_video_top1"], arms["agd_dense"]["zeroshot_video_top1"]),
        "moe_vs_dense_params_per_token": ratio(base["params_per_token"], arms["agd_dense"]["params_per_token"]),
    }
    print(table(arms))
    growth = max((a["worker_pss_growth"] for a in arms.values() if "worker_pss_growth" in a), default=None)
    print(f"worker PSS growth (worst worker, final / 10% of the run): {growth}")
    mfu = cpu_mfu(steps=1 if quick else 3)
    return write_results(out, "train", {"quick": quick, "arms": arms, "ratios": ratios, "worker_pss_growth": growth,
                                        "cpu_mfu": mfu})


def cpu_mfu(steps: int, overrides: list[str] | None = None) -> dict[str, Any]:
    """The demo recipe's step MFU per preset, on its threads per worker (its data must be processed).

    ``two_threads_speedup`` (demo preset): its step on twice the threads against on its own, the
    lever "one worker with 2 intra-op threads vs two 1-thread workers": below ~1.9 (two workers
    pay an all-reduce of the grads per step), the two workers train faster.
    """
    from imp_platform.bench.mfu import step_mfu
    from imp_platform.config.train import load_pretrain_config
    from imp_platform.train.loop import worker_threads

    out: dict[str, Any] = {}
    for preset in MFU_PRESETS:
        cfg = load_pretrain_config(None, [*(overrides or []), f"model.preset={preset}"])
        mfu = out[preset] = step_mfu(cfg, worker_threads(cfg), steps)
        print(f"cpu_mfu {preset}: {mfu['cpu_mfu']:.3f} ({mfu['train_gflops_per_s']:.1f} training GFLOP/s "
              f"over {mfu['gemm_gflops_per_s']:.1f} GEMM GFLOP/s on {mfu['threads']} thread(s))")
    demo = load_pretrain_config(None, overrides or [])
    doubled = step_mfu(demo, 2 * worker_threads(demo), steps)
    out["two_threads_speedup"] = ratio(doubled["train_gflops_per_s"], out[MFU_PRESETS[0]]["train_gflops_per_s"])
    print(f"{MFU_PRESETS[0]} step on {doubled['threads']} threads vs {worker_threads(demo)}: "
          f"{out['two_threads_speedup']}x")
    return out


def worker_memory(history: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Each worker's PSS (MiB) at 10% and at 100% of the run, and the worst worker's final/10% ratio."""
    rows = [r for r in history if r.get("worker_pss_mb")]
    if not rows:
        return {}
    early = next(r for r in rows if r["step"] >= steps / 10)
    final = rows[-1]
    return {"worker_pss_mb_10pct": early["worker_pss_mb"], "worker_pss_mb_final": final["worker_pss_mb"],
            "worker_pss_growth": round(max(b / a for a, b in zip(early["worker_pss_mb"], final["worker_pss_mb"])), 3)}



def table(arms: dict[str, dict[str, Any]]) -> str:
    head = f"{'arm':<10} {'steps':>5} {'wall s':>7} {'tok/s':>8} {'PPT':>8} {'video':>6} {'audio':>6} {'image':>6} {'vt R@1':>6}"
    lines = [head, "-" * len(head)]
    for name, a in arms.items():
        cells = [f"{a[k]:.3f}" if a.get(k) is not None else "  -  " for k in KEYS[:4]]
        lines.append(f"{name:<10} {a['steps']:>5} {a['wall_s']:>7.1f} {a['tokens_per_s']:>8.0f} "
                     f"{a['params_per_token']:>8} {cells[0]:>6} {cells[1]:>6} {cells[2]:>6} {cells[3]:>6}")
    return "\n".join(lines)
