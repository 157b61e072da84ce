"""Preprocess job: `python jobs/preprocess.py PIPELINE.yaml [--input P] [--output P] [--set key=value ...]`.

The `ray job submit` twin of `platform data preprocess`: parses arguments and calls the
library (joins the cluster it is submitted to), then prints the summary table.
"""

from __future__ import annotations

import argparse
import logging
import sys

from imp_platform.config import ConfigError
from imp_platform.data.manifest import format_summary
from imp_platform.data.pipeline import load_preprocess_config, preprocess


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", nargs="?", default=None, help="pipeline YAML (default: pipelines/moving_digits.yaml)")
    parser.add_argument("--input", default=None, help="source shards (folder, glob or s3://); replaces source.paths")
    parser.add_argument("--output", default=None, help="output folder or s3:// prefix; replaces output.path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a pipeline key, e.g. --set decode.num_actors=4 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        manifest = preprocess(load_preprocess_config(args.pipeline, args.input, args.output, args.overrides))
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
