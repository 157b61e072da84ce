"""``platform bench selftrain``: Video-STaR self-training on moving digits, 10% of the clips labelled.

The training split's shards are cut in ten: the first is the labelled seed, the other nine the
unlabelled split, whose labels serve only as weak labels for the keep filter and as the hidden
truth the kept labels are scored against. The shipped ``jobs/configs/selftrain.yaml`` then runs
round 0 (seed only) and two self-training rounds. The baseline, measured in the same run: round
0's model trained on the seed alone for as many more steps as the rounds add, so a gain over it
comes from the kept data, not from the extra steps.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from imp_platform.bench.common import ratio, write_results

log = logging.getLogger(__name__)

SHARDS = 10  # the seed is one shard of ten: 10% of the clips labelled
CONFIG = Path(__file__).resolve().parents[3] / "jobs" / "configs" / "selftrain.yaml"


def write_splits(raw: Path, train_samples: int, test_samples: int, seed: int = 0) -> None:
    """``raw/seed`` (one shard), ``raw/unlabeled`` (nine), ``raw/test`` and the tokenizer, from moving digits."""
    from imp_platform.data.synth import write_dataset

    shards = write_dataset(raw, samples=train_samples, shards=SHARDS, seed=seed, split="train").shards
    for split, chosen in (("seed", shards[:1]), ("unlabeled", shards[1:])):
        (raw / split).mkdir(parents=True, exist_ok=True)
        for shard in chosen:
            shard.rename(raw / split / shard.name)
    (raw / "train").rmdir()
    write_dataset(raw, samples=test_samples, shards=2, seed=seed, split="test")


def run(quick: bool, out: Path) -> dict[str, Any]:
    """Write the splits, run the rounds and the seed-only baseline; write the JSON and the rounds PNG beside it."""
    from imp_platform.config.selftrain import load_selftrain_config
    from imp_platform.config.train import load_pretrain_config
    from imp_platform.selftrain.rounds import PLOT_NAME, format_rounds, round_config, run_selftrain
    from imp_platform.train.comd import train

    train_samples, test_samples = (400, 150) if quick else (1000, 300)
    round0_steps, steps_per_round = (400, 200) if quick else (600, 300)
    with tempfile.TemporaryDirectory(prefix="imp-bench-selftrain-") as tmp:
        root = Path(tmp) / "data"
        write_splits(root / "raw", train_samples, test_samples)
        base = [f"data.root={root}", "data.synth=null", "data.eval_split=test", f"run.storage_path={tmp}/ray",
                "run.num_workers=1", "run.tensorboard=false", "run.eval_every=1000000", "eval.max_samples=null"]
        sc = load_selftrain_config(CONFIG, [f"base_overrides={json.dumps(base)}", "name=bench-selftrain", "rounds=2",
                                            f"round0_steps={round0_steps}", f"steps_per_round={steps_per_round}"])
        result = run_selftrain(sc, Path(tmp) / "out")
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "out" / PLOT_NAME, out.with_suffix(".png"))
        extra = sc.rounds * steps_per_round
        cfg = round_config(load_pretrain_config(sc.base, sc.base_overrides).with_absolute_paths(), sc, sc.seed_split,
                           1, extra, result["rounds"][0]["checkpoint"])
        alone = train(cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": "bench-selftrain-seed-only"})}))
    rounds = [{k: r[k] for k in ("round", "kept", "inferred", "kept_frac", "kept_label_accuracy", "heldout_top1",
                                 "train_samples", "head_video_cls_top1", "caption_label_word_accuracy",
                                 "caption_token_accuracy", "caption_bleu4", "wall_s")
               if k in r} for r in result["rounds"]]
    first, last = rounds[0], rounds[-1]
    seed_only = {"steps": round0_steps + extra, "heldout_top1": alone.metrics.get(sc.heldout_metric),
                 "head_video_cls_top1": alone.metrics.get("head_video_cls_top1"), "wall_s": round(alone.wall_s, 1)}
    summary = {
        "quick": quick, "labelled_fraction": 1 / SHARDS, "train_samples": train_samples, "test_samples": test_samples,
        "round0_steps": round0_steps, "steps_per_round": steps_per_round, "predict": sc.predict,
        "keep": sc.keep.model_dump(mode="json"), "heldout_metric": sc.heldout_metric,
        "rounds": rounds, "seed_only": seed_only,
        "heldout_top1_final_over_round0": ratio(last["heldout_top1"], first["heldout_top1"]),
        "heldout_top1_final_over_seed_only": ratio(last["heldout_top1"], seed_only["heldout_top1"]),
        "kept_frac_final_over_round0": ratio(last["kept_frac"], first["kept_frac"]),
        "figure": str(out.with_suffix(".png")),
    }
    print(format_rounds(result))
    print(f"seed only, {seed_only['steps']} steps: held-out {sc.heldout_metric} {seed_only['heldout_top1']}")
    return write_results(out, "selftrain", summary)

