"""AGD pretraining job: `python jobs/pretrain.py [--config FILE] [--set key=value ...]`.

With no arguments it runs the embedded default (jobs/configs/pretrain.yaml): synth ->
preprocess -> AGD pretraining with 2 Ray Train workers -> eval -> report, then prints the
peak memory and the wall time of each phase (also in the report's metrics.json as
``time_<phase>_s``). Works the same under `ray job submit --working-dir . -- python
jobs/pretrain.py` (joins that cluster).
"""

from __future__ import annotations

import argparse
import sys

from imp_platform.cli.common import job_exit_code
from imp_platform.train.entry import run_pretrain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="pretrain YAML (default: jobs/configs/pretrain.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set run.steps=100 (repeatable)")
    args = parser.parse_args(argv)
    return job_exit_code(run_pretrain, args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
