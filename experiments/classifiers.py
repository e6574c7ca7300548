"""Train the reference classifiers and write `results/classifiers.md` and `.json`.

    python experiments/classifiers.py \
        --configs configs/defuse_cnn_fmnist.py configs/resnet18_fmnist.py

Each config trains into `<runs>/<name>` (resumable: run the same command again after a kill).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from jfail.config import load_config
from jfail.logs import quiet_libraries
from jfail.train.run import run_classifier, write_json

TARGETS = {"defuse_cnn_fmnist": 0.90, "resnet18_fmnist": 0.92}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--runs", default="runs/classifiers")
    parser.add_argument("--out", default="results/classifiers")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    quiet_libraries()
    command = "python experiments/classifiers.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    rows = []
    for path in args.configs:
        config = load_config(path)
        metrics = run_classifier(
            config, Path(args.runs) / config.name, progress=not args.quiet and sys.stderr.isatty()
        )
        rows.append({"config": path, **metrics})
    write_json(Path(args.out + ".json"), {"command": command, "runs": rows})
    Path(args.out + ".md").write_text(_markdown(command, rows))
    print(Path(args.out + ".md").read_text())


def _markdown(command: str, rows: list[dict]) -> str:
    lines = [
        "# Classifiers",
        "",
        "Produced by:",
        "",
        "```",
        command,
        "```",
        "",
        "| run | data | model | params | epochs | best epoch | val acc. | test acc. | target "
        "| train time (s) | device |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        target = TARGETS.get(row["name"])
        kwargs = ", ".join(f"{k}={v}" for k, v in row["model_kwargs"].items())
        lines.append(
            f"| {row['name']} | {row['dataset']} | {row['model']}"
            f"{f' ({kwargs})' if kwargs else ''} | {row['num_params']:,} | {len(row['history'])} | "
            f"{row['best_epoch'] + 1} | {100 * row['val_accuracy']:.2f} % | "
            f"{100 * row['test_accuracy']:.2f} % | "
            f"{'≥ ' + format(100 * target, '.0f') + ' %' if target else ''} | "
            f"{row['train_seconds']:.0f} | {row['devices'][0]} |"
        )
    lines += ["", "Per-epoch history (train loss / train acc. / val acc.):", ""]
    for row in rows:
        history = "; ".join(
            f"{h['epoch'] + 1}: {h['train_loss']:.3f} / {100 * h['train_accuracy']:.1f} / "
            f"{100 * h['val_accuracy']:.2f}"
            for h in row["history"]
        )
        lines.append(f"- {row['name']}: {history}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
