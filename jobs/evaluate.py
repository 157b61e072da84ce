"""Held-out eval of a checkpoint: `python jobs/evaluate.py --checkpoint PATH [--out DIR]`.

Writes metrics.json (zero-shot top-1 for video/audio/image, retrieval R@1/5/10) and report.png.
"""

from __future__ import annotations

import argparse
import sys

from imp_platform.cli.common import job_exit_code
from imp_platform.train.entry import run_eval


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (local or s3://)")
    parser.add_argument("--out", default=None, help="output folder (default runs/<run name>/eval)")
    parser.add_argument("--max-samples", type=int, default=None, help="cap on held-out samples")
    args = parser.parse_args(argv)
    return job_exit_code(run_eval, args.checkpoint, args.out, args.max_samples)


if __name__ == "__main__":
    sys.exit(main())
