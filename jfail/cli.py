"""The `jfail` command: the demo, each method's full run, classifier training, reports, annotation.

    jfail demo                                   # all four methods, small, one report
    jfail barlow --config configs/barlow_fmnist.py
    jfail defuse --config configs/defuse_fmnist.py
    jfail debugtests --config configs/debug_tests.py
    jfail prime --config configs/prime_fmnist.py
    jfail barlow --config configs/barlow_fmnist.py --set model=my_models:classifier \
        --set dataset=imagefolder:my_images       # one's own model and images
    jfail train --config configs/defuse_cnn_mnist5k.py
    jfail report RUN_DIR                         # rebuild RUN_DIR/report.html
    jfail annotate RUN_DIR                       # the Defuse annotation page on 127.0.0.1

On many hosts every process runs the same command: under SLURM (`srun`) or on a Cloud TPU pod
JAX finds the other processes by itself; anywhere else give each process `--coordinator HOST:PORT`
(process 0's address), `--num-processes N` and `--process-id I`. The run directory must then be
one folder every host sees; process 0 writes its log, config, results and report, the others only
what the engine shards among them, and log to stderr (lines prefixed `process <i>:`).

Every command writes a run directory (`--workdir`, default `runs/<command>-<time>`) with a log
file, `jfail.log`; the method commands and the demo also write `report.html`. A method command
reads its classifiers from finished `jfail train` runs (or the model `model=package.module:function`
returns, `jfail.models.user`) and trains none outside its run directory. Progress bars show
on a terminal and never with `--quiet` or when stderr is not a terminal (CI, pipes).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import errno
import importlib
import json
import logging
import os
import sys
import threading
from pathlib import Path

__all__ = ["main", "entry", "describe_failure", "UsageError"]

log = logging.getLogger("jfail.cli")

class UsageError(ValueError):
    """Command-line options that do not fit together (the multi-host flags); exit status 2."""


_PIPELINES = {command: (title, module) for command, title, module in (
    ("barlow", "Barlow", "jfail.pipelines.barlow"),
    ("defuse", "Defuse", "jfail.pipelines.defuse"),
    ("debugtests", "Debugging tests for explanations", "jfail.pipelines.debug_tests"),
    ("prime", "PRIME", "jfail.pipelines.prime"),
)}


def main(argv: list[str] | None = None) -> int:
    """Run one `jfail` command; returns its exit status.

    0 on success; 2 for bad input (a config, an override, a data set name, a path), with one line
    on stderr saying what and where; 1 for a fault of the environment (disk full, a read-only
    or missing directory, a port in use) or an unexpected error. `--debug` shows the traceback.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    from jfail.logs import quiet_libraries

    quiet_libraries()
    try:
        return _run(parser, args)
    except Exception as error:  # noqa: BLE001 - every failure becomes one line and a status
        if args.debug:
            raise
        status, message = describe_failure(error)
        print(f"jfail {args.command}: {message}", file=sys.stderr)
        return status


def entry() -> None:
    """The console script: `main`, then an exit that skips the interpreter's teardown after an
    environment fault (background checkpoint threads would otherwise print pages of noise)."""
    status = main()
    if status == 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(1)
    sys.exit(status)


def describe_failure(error: BaseException) -> tuple[int, str]:
    """`(exit status, one line)` for an error that ends a command (see `main`)."""
    from jfail.config import ConfigError
    from jfail.data import DatasetNotFoundError
    from jfail.models.user import UserModelError

    fault = _environment_fault(error)
    if fault is not None:
        return 1, fault
    first = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, (ConfigError, DatasetNotFoundError, UserModelError, UsageError)):
        return 2, first
    if isinstance(error, (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError,
                          NotADirectoryError)):
        return 2, f"{first} (rerun with --debug for the traceback)"
    return 1, (f"unexpected {type(error).__name__}: {first}; rerun with --debug for the "
               "traceback")


_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EADDRINUSE: "the address is already in use",
    errno.EMFILE: "too many open files",
}
_ENVIRONMENT_TEXTS = {text: text for text in (
    "No space left on device", "Disk quota exceeded", "Read-only file system")}


def _environment_fault(error: BaseException) -> str | None:
    """One line for a disk, permission or port fault anywhere in `error`'s chain, else None.
    Libraries that write in threads (orbax, tensorstore) re-raise an OSError as their own
    error with the OS's message inside, so the messages are matched too."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
            where = f" ({error.filename})" if error.filename else ""
            return (f"{_ENVIRONMENT_ERRNOS[error.errno]}{where}: fix that, then run the same "
                    "command again (a run resumes from its last checkpoint)")
        for text in _ENVIRONMENT_TEXTS:
            if text in str(error):
                return (f"{text[0].lower()}{text[1:]}: fix that, then run the same command again "
                        "(a run resumes from its last checkpoint)")
        error = error.__cause__ or error.__context__
    return None


def _run(parser, args) -> int:
    if args.command in ("report", "annotate"):
        run_dir = Path(args.run_dir)
        if not run_dir.is_dir():
            parser.error(f"{run_dir} is not a run directory")
        return _report(run_dir) if args.command == "report" else _annotate(run_dir, args)

    _join_hosts(args)  # before anything computes with JAX, the config's model check included
    from jfail.engine import is_writer

    config = _load_checked_config(args) if hasattr(args, "config") else None
    run_dir = Path(args.workdir or f"runs/{args.command}-{_started_at()}")
    run_dir = run_dir.absolute()  # the report resolves relative Markdown paths against run_dir
    if args.command in _PIPELINES:
        _check_models(config, run_dir)
    if is_writer():
        run_dir.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet and sys.stderr.isatty() and is_writer()
    with _logging_to(run_dir / "jfail.log"):
        if args.command == "train":
            return _train(config, run_dir, progress)
        if args.command == "demo":
            from jfail.demo import run_demo

            report = run_demo(run_dir, dataset=args.data, progress=progress,
                              methods=tuple(args.methods) if args.methods else None)
            _print_result({"run_dir": str(run_dir), "report": str(report)})
            return 0
        return _method(args, config, run_dir)


def _join_hosts(args) -> None:
    """Join a multi-host run: the one `--coordinator`, `--num-processes` and `--process-id` name,
    or, without them, the one JAX detects in the environment (SLURM, a Cloud TPU pod, Open MPI,
    a Kubernetes job); a plain single-process run joins nothing.

    Raises:
      UsageError: only some of the three flags, a coordinator that is not HOST:PORT, a process
        count or id that is not a whole number in range.
    """
    from jfail.engine import NoClusterError, initialize_distributed

    flags = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
             "--process-id": args.process_id}
    missing = [flag for flag, value in flags.items() if value is None]
    if len(missing) == len(flags):
        try:
            initialize_distributed()
        except NoClusterError:  # no multi-process launch in the environment
            pass
        except RuntimeError as error:
            if "before any JAX computation" not in str(error):
                raise
            # main() called from Python code that already computes with JAX: one process.
            log.debug("JAX is already in use in this process: running as one process")
        return
    if missing:
        raise UsageError(
            f"give all three of --coordinator HOST:PORT, --num-processes N and --process-id I "
            f"(one process of a multi-host run), or none of them; {', '.join(missing)} missing")
    host, colon, port = args.coordinator.rpartition(":")
    if not (colon and host and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise UsageError(f"--coordinator must be HOST:PORT (process 0's address, a port in "
                         f"1..65535), got {args.coordinator!r}")
    count, index = args.num_processes.strip(), args.process_id.strip()
    if not (count.isascii() and count.isdigit() and int(count) >= 1):
        raise UsageError(f"--num-processes must be a whole number >= 1, got {args.num_processes!r}")
    if not (index.isascii() and index.isdigit() and int(index) < int(count)):
        raise UsageError(f"--process-id must be a whole number in 0..{int(count) - 1} (for "
                         f"--num-processes {count}), got {args.process_id!r}")
    initialize_distributed(args.coordinator, int(count), int(index))


def _started_at() -> str:
    """The time in the default run directory's name: process 0's, so that every process of a
    multi-host run names the same directory."""
    import jax

    now = _dt.datetime.now()
    if jax.distributed.is_initialized() and jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        seconds = multihost_utils.broadcast_one_to_all(np.int64(int(now.timestamp())))
        now = _dt.datetime.fromtimestamp(int(seconds))
    return f"{now:%Y%m%d-%H%M%S}"


def _print_result(summary: dict) -> None:
    """The command's JSON summary on stdout, once: by process 0 of a multi-host run."""
    from jfail.engine import is_writer

    if is_writer():
        print(json.dumps(summary, indent=2))


def _load_checked_config(args):
    """The command's config with its overrides, validated before anything is written."""
    from jfail import config as configs

    expected = {"train": configs.ClassifierRunConfig, "barlow": configs.BarlowConfig,
                "defuse": configs.DefuseConfig, "debugtests": configs.DebugTestsConfig,
                "prime": configs.PrimeConfig}[args.command]
    try:
        config = configs.load_config(args.config, args.set)
    except FileNotFoundError as error:
        raise configs.ConfigError(str(error)) from error
    if not isinstance(config, expected):
        raise configs.ConfigError(
            f"{args.config} returns a {type(config).__name__}; `jfail {args.command}` needs a "
            f"{expected.__name__}")
    configs.validate_config(config)
    return config


def _check_models(config, run_dir: Path) -> None:
    """Before the run directory is made: a user's `model=package.module:function` imports and
    can be called on the data's images; otherwise every classifier run the method reads holds a
    finished run. jfail writes only into the run directory, so a classifier run elsewhere is
    never trained by a method command (`jfail train` makes one); one inside the run directory
    is trained there first.

    Raises:
      UserModelError: the user's model cannot be used (`jfail.models.user`).
      ConfigError: a classifier run outside `run_dir` without `metrics.json`.
    """
    from jfail import config as configs
    from jfail.models.user import user_model_for_data
    from jfail.prime.config import PrimeConfig

    if getattr(config, "model", None) is not None and not isinstance(
            config, configs.ClassifierRunConfig):
        needs = {configs.BarlowConfig: ("features",), configs.DefuseConfig: ("trainable",)}.get(
            type(config), ())
        user_model_for_data(config.model, config.dataset, needs=needs)
        return
    inside = run_dir.resolve()
    for field, path, command in _classifier_runs(config):
        where = Path(path).resolve()
        if (where / "metrics.json").is_file() or where.is_relative_to(inside):
            continue
        other = (" or give model=package.module:function (your own model)"
                 if isinstance(config, (configs.BarlowConfig, configs.DefuseConfig, PrimeConfig))
                 else "")
        raise configs.ConfigError(
            f"{field}: no trained classifier in {path}: train one with `{command}`{other}")


def _classifier_runs(config):
    """`(field, run folder, the jfail train command that makes it)` of every classifier run a
    method config reads."""
    from jfail import config as configs
    from jfail.prime.config import PrimeConfig

    def train(config_file, run, *sets):
        return " ".join(["jfail train --config", str(config_file),
                         *(f"--set {item}" for item in sets), "--workdir", str(run)])

    runs = []
    if isinstance(config, (configs.BarlowConfig, PrimeConfig, configs.DefuseConfig,
                           configs.DebugTestsConfig)):
        runs.append(("classifier_run", config.classifier_run,
                     train(config.classifier_config, config.classifier_run)))
    if isinstance(config, configs.BarlowConfig):
        runs.append(("robust_run", config.robust_run, train(config.robust_config,
                                                            config.robust_run)))
    if isinstance(config, configs.DebugTestsConfig) and "table3" in config.parts:
        runs.append(("ood_run", config.ood_run, train(config.ood_config, config.ood_run)))
    if isinstance(config, configs.DefuseConfig):
        base = configs.load_config(config.annotator_config)
        for i in range(1, config.num_annotators + 1):  # as jfail.pipelines.defuse trains them
            run = Path(config.annotator_runs) / f"seed{i}"
            runs.append(("annotator_runs", str(run),
                         train(config.annotator_config, run, f"name={base.name}_seed{i}",
                               f"train.seed={i}")))
    return runs


# --------------------------------------------------------------------------------------------
# Private helpers.


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jfail", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]))
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of a failure")

    def run_options(command):
        command.add_argument("--workdir", help="run directory (default runs/<command>-<time>)")
        command.add_argument("--quiet", action="store_true", help="no progress bars")
        hosts = command.add_argument_group(
            "many hosts", "one process of a multi-host run: give all three, in every process "
            "(under SLURM or on a TPU pod JAX finds them itself)")
        hosts.add_argument("--coordinator", metavar="HOST:PORT",
                           help="process 0's address, reachable from every process")
        hosts.add_argument("--num-processes", metavar="N", help="how many processes take part")
        hosts.add_argument("--process-id", metavar="I", help="this process's number, 0..N-1")
        return command

    demo = run_options(sub.add_parser(
        "demo", parents=[common],
        help="Barlow, Defuse, the debugging tests and PRIME, small, with one report"))
    from jfail.demo import DATA_PREFERENCE, METHODS

    demo.add_argument("--data", choices=DATA_PREFERENCE,
                      help="data set (default: the first reachable of " +
                      ", ".join(DATA_PREFERENCE) + ")")
    demo.add_argument("--methods", nargs="+", choices=[m[0] for m in METHODS],
                      help="run only these methods")
    for command, (title, _) in _PIPELINES.items():
        method = run_options(sub.add_parser(command, parents=[common],
                                            help=f"{title} with a config's full settings"))
        method.add_argument("--config", required=True, help="a file in configs/")
        method.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config field (repeatable)")
    train = run_options(sub.add_parser("train", parents=[common],
                                       help="train a classifier from a config file"))
    train.add_argument("--config", required=True, help="a file in configs/ defining get_config()")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.epochs=3 (repeatable)",
    )
    report = sub.add_parser("report", parents=[common],
                            help="rebuild RUN_DIR/report.html from its Markdown")
    report.add_argument("run_dir")
    annotate = sub.add_parser("annotate", parents=[common],
                              help="serve the Defuse annotation page (loopback only)")
    annotate.add_argument("run_dir", help="a Defuse run directory (with annotation/)")
    annotate.add_argument("--port", default="8765",
                          help="port on 127.0.0.1, 1..65535, or 0 for a free one (default 8765)")
    return parser


def _train(config, run_dir: Path, progress: bool) -> int:
    from jfail.train.run import run_classifier

    metrics = run_classifier(config, run_dir, progress=progress)
    summary = {k: metrics[k] for k in ("name", "test_accuracy", "val_accuracy", "best_epoch")}
    _print_result({**summary, "run_dir": str(run_dir)})
    return 0


def _method(args, config, run_dir: Path) -> int:
    """One method's pipeline with a config's settings, then the run's report."""
    from jfail.pipelines import report_source
    from jfail.report import write_report

    title, module_name = _PIPELINES[args.command]
    argv = ["--config", args.config] + [item for s in args.set for item in ("--set", s)]
    if args.command == "prime":
        argv += ["--out", str(run_dir / config.name)]
    else:
        argv += ["--out-dir", str(run_dir)]
    if args.command == "defuse":
        argv += ["--workdir", str(run_dir / "work")]
    if args.quiet:
        argv.append("--quiet")
    from jfail.logs import stdout_to_file

    pipeline = importlib.import_module(module_name)
    with stdout_to_file(run_dir / "jfail.log"):
        # the pipeline records the command that reruns exactly this step
        pipeline.main(argv, prog=f"python -m {module_name}")
    from jfail.engine import is_writer

    if not is_writer():  # process 0 writes the report
        return 0
    report = write_report(run_dir, [(title, report_source(pipeline, run_dir / config.name))],
                          title=f"jfail {title}")
    _print_result({"run_dir": str(run_dir), "report": str(report)})
    return 0


def _report(run_dir: Path) -> int:
    from jfail.report import rebuild_report

    print(rebuild_report(run_dir))
    return 0


def _annotate(run_dir: Path, args) -> int:
    """Serve the annotation folder of a Defuse run: RUN_DIR itself, or its work directory.

    A bad --port or an unusable run directory is one line on stderr and exit status 2; a port
    that cannot be bound (in use, privileged) is one line and exit status 1.
    """
    from jfail.defuse.annotation_server import ANNOTATION_DIR, run_annotation_server

    def fail(message: str, status: int) -> int:
        print(f"jfail annotate: {message}", file=sys.stderr, flush=True)
        return status

    port = args.port.strip()
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        return fail(f"--port must be an integer in 0..65535 (0 picks a free port), got "
                    f"{args.port!r}", 2)
    candidates = [run_dir, run_dir / "work", run_dir / "work" / "defuse"]
    found = next((c for c in candidates if (c / ANNOTATION_DIR / "labels.csv").is_file()), None)
    if found is None:
        return fail(f"no {ANNOTATION_DIR}/labels.csv in {run_dir} or its work directory; run "
                    "`jfail defuse` (or `jfail demo`) first", 2)
    try:
        run_annotation_server(found, port=int(port))
    except (FileNotFoundError, ValueError) as error:  # a damaged annotation folder
        return fail(str(error), 2)
    except OSError as error:  # the port cannot be bound: in use, or not ours to take
        return fail(error.strerror or str(error), 1)
    return 0


_UNRAISABLE_LOG = "jfail.threads.unraisable"


class _logging_to:
    """jfail's log into `path`; stage messages and warnings on stderr."""

    _CONSOLE = ("jfail.cli", "jfail.demo")

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        from jfail.logs import log_to_file

        self.file = log_to_file(self.path)
        self.console = logging.StreamHandler(sys.stderr)
        self.console.setFormatter(logging.Formatter("%(message)s"))
        from jfail.engine import is_writer

        writer = is_writer()  # another process's log already goes to stderr (log_to_file)
        self.console.addFilter(
            lambda record: writer and record.name != _UNRAISABLE_LOG
            and (record.levelno >= logging.WARNING or record.name in self._CONSOLE))
        jfail_log = logging.getLogger("jfail")
        jfail_log.addHandler(self.console)
        jfail_log.propagate = False
        # Libraries that write from threads (orbax through absl) report a failed write once per
        # thread; those reports go to the log file, and the command's own line to stderr.
        absl_log = logging.getLogger("absl")
        absl_log.addHandler(self.file)
        self.absl_propagate, absl_log.propagate = absl_log.propagate, False
        self.excepthook, threading.excepthook = threading.excepthook, self._thread_failed
        # Native threads (tensorstore's callbacks into an event loop orbax has closed after a
        # failed write) report errors nobody can catch through sys.unraisablehook: those go to
        # the log file only, the failed write itself reaches the command's one line.
        self.unraisablehook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def _thread_failed(self, failure) -> None:
        logging.getLogger("jfail.threads").error(
            "thread %s failed", getattr(failure.thread, "name", "?"),
            exc_info=(failure.exc_type, failure.exc_value, failure.exc_traceback))

    def _unraisable(self, unraisable) -> None:
        logging.getLogger(_UNRAISABLE_LOG).error(
            "%s", unraisable.err_msg or "an error no caller could catch",
            exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))

    def __exit__(self, *exc):
        jfail_log = logging.getLogger("jfail")
        for handler in (self.file, self.console):
            jfail_log.removeHandler(handler)
        logging.getLogger("absl").removeHandler(self.file)
        logging.getLogger("absl").propagate = self.absl_propagate
        threading.excepthook = self.excepthook
        sys.unraisablehook = self.unraisablehook
        for handler in (self.file, self.console):
            handler.close()
        jfail_log.propagate = True
        return False


if __name__ == "__main__":
    entry()
