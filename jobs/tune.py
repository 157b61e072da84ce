"""Run a Ray Tune sweep of pretraining configs: ``python jobs/tune.py --space jobs/mixing.yaml``.

Works locally and as a ``ray job submit`` entrypoint (it joins the cluster at RAY_ADDRESS).
"""

from __future__ import annotations

import argparse
import logging

from imp_platform.config import ConfigError
from imp_platform.tune.runner import run_sweep_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--space", required=True, help="sweep YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override key=value")
    parser.add_argument("--resume", action="store_true", help="continue the sweep of the same name")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = run_sweep_file(args.space, args.overrides, resume=args.resume)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(result.summary())


if __name__ == "__main__":
    main()
