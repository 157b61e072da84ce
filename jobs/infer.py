"""Batch inference job: `python jobs/infer.py --checkpoint C --input PATH --out PATH [--what embed,zeroshot]`.

The `ray job submit` twin of `platform infer`: parses arguments and calls the library (joins
the cluster it is submitted to), then prints rows written and skips.
"""

from __future__ import annotations

import argparse
import logging
import sys

from imp_platform.cli.common import job_exit_code
from imp_platform.config.base import apply_overrides
from imp_platform.infer.batch import format_summary, infer_config, run_inference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="run checkpoint or exported model folder")
    parser.add_argument("--input", required=True, help="raw .tar shards (folder, glob, s3://) or a processed split")
    parser.add_argument("--out", required=True, help="output folder: part-*.parquet and summary.json")
    parser.add_argument("--what", default=None, help="comma-separated: embed, classify, caption, zeroshot")
    parser.add_argument("--pipeline", default=None, help="pipeline YAML that decodes raw shards")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a pipeline key, e.g. --set decode.num_actors=4 (repeatable)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per model forward")
    parser.add_argument("--num-actors", type=int, default=None, help="model replicas (default: one per GPU, else one)")
    parser.add_argument("--seed", type=int, default=None, help="torch seed before every batch")
    parser.add_argument("--caption-max-len", type=int, default=None, help="most caption tokens")
    parser.add_argument("--beam-size", type=int, default=None, help="caption beams (1 = greedy)")
    parser.add_argument("--storage-option", dest="storage", action="append", default=[], metavar="KEY=VALUE",
                        help="s3fs option for an s3:// checkpoint and --out, e.g. endpoint_url=http://minio:9000")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def run() -> None:
        cfg = infer_config(args.checkpoint, args.input, args.out, args.what, args.pipeline, args.overrides,
                           batch_size=args.batch_size, num_actors=args.num_actors, seed=args.seed,
                           caption_max_len=args.caption_max_len, caption_beam_size=args.beam_size,
                           storage_options=apply_overrides({}, args.storage) if args.storage else None)
        print(format_summary(run_inference(cfg)))

    return job_exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
