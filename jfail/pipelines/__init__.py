"""The papers' experiments as importable pipelines, each `main(argv)` reading a config file.

`experiments/<name>.py` and `jfail <method> --config ...` both call these.
"""

import shlex
import sys
from pathlib import Path


def command_line(prog: str, argv: list[str] | None) -> str:
    """The command a results file says produced it: `prog` and its arguments (`sys.argv[1:]`
    when `argv` is None), shell-quoted, with no trailing space when there are none."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join([prog, shlex.join(args)]) if args else prog


def report_source(pipeline, results: Path):
    """What a run's report shows of a pipeline's results `results` (`<out>/<name>`, no suffix).

    Args:
      pipeline: the pipeline's module; its `REPORT_TEMPLATE` names the template that renders its
        JSON (a pipeline without one is shown from its Markdown file).
      results: the folder and name of its results files.
    Returns:
      A `jfail.report.Result` of `<results>.json`, or the path of `<results>.md`.
    """
    from jfail.report import Result

    template = getattr(pipeline, "REPORT_TEMPLATE", None)
    if template is None:
        return results.parent / f"{results.name}.md"
    return Result(template, results.parent / f"{results.name}.json")


def user_splits(dataset: str, wanted: set[str], *, seed: int) -> dict:
    """The splits of `dataset` a method on one's own model reads: "train" (all of it), "val"
    (`jfail.models.user.USER_VAL_FRACTION` of it, stratified, drawn with `seed`) and "test"."""
    from jfail.data import load, train_val_split
    from jfail.models.user import USER_VAL_FRACTION

    parts = {}
    if wanted & {"train", "val"}:
        parts["train"] = load(dataset, "train")
        if "val" in wanted:
            _, parts["val"] = train_val_split(parts["train"], USER_VAL_FRACTION, key=seed)
    if "test" in wanted:
        parts["test"] = load(dataset, "test")
    return parts
