"""Self-training job: `python jobs/selftrain.py [--config FILE] [--set key=value ...] [--out DIR]`.

The `ray job submit` twin of `platform selftrain` (default config: jobs/configs/selftrain.yaml):
joins the cluster it is submitted to, runs every round and prints one line per round.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from imp_platform.cli.common import job_exit_code
from imp_platform.config.selftrain import load_selftrain_config
from imp_platform.selftrain.rounds import format_rounds, run_selftrain

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "selftrain.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="selftrain YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set rounds=1 (repeatable)")
    parser.add_argument("--out", default=None, help="folder for selftrain.json and selftrain.png (default runs/<name>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def run() -> None:
        sc = load_selftrain_config(args.config, args.overrides)
        print(format_rounds(run_selftrain(sc, args.out or Path("runs") / sc.name)))

    return job_exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
