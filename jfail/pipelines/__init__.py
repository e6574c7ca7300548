"""The papers' experiments as importable pipelines, each `main(argv)` reading a config file.

`experiments/<name>.py` and `jfail <method> --config ...` both call these.
"""

import shlex
import sys


def command_line(prog: str, argv: list[str] | None) -> str:
    """The command a results file says produced it: `prog` and its arguments (`sys.argv[1:]`
    when `argv` is None), shell-quoted, with no trailing space when there are none."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join([prog, shlex.join(args)]) if args else prog
