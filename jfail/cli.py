"""The `jfail` command."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import sys
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jfail", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a classifier from a config file")
    train.add_argument("--config", required=True, help="a file in configs/ defining get_config()")
    train.add_argument("--workdir", help="run directory (default runs/<name>-<time>)")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.epochs=3 (repeatable)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    from jfail.logs import quiet_libraries

    quiet_libraries()
    from jfail.config import ClassifierRunConfig, load_config

    try:
        config = load_config(args.config, args.set)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as error:
        parser.error(str(error).strip("'\""))
    if not isinstance(config, ClassifierRunConfig):
        parser.error(f"{args.config} is not a classifier training config")
    from jfail.train.run import run_classifier

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.workdir or f"runs/{config.name}-{stamp}")
    progress = not args.quiet and sys.stderr.isatty()
    metrics = run_classifier(config, run_dir, progress=progress)
    summary = {k: metrics[k] for k in ("name", "test_accuracy", "val_accuracy", "best_epoch")}
    print(json.dumps({**summary, "run_dir": str(run_dir)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
