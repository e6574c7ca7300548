"""The annotation page for Defuse (seed 001, §3.2, appendix C and Figure 14; Figure 6).

The paper's crowd workers see one generated image at a time with a button per class and a
"None of the above" button; each image goes to several workers and the majority vote is its
label. This module serves such a page from a run directory on the loopback interface only, so
that several people (each identified by the name they type) can label at once:

    prepare_annotation(run_dir, samples, predictions, class_names)  # writes run_dir/annotation/
    serve(run_dir)                  # background server (`.url`, `.port`, `.shutdown()`)
    run_annotation_server(run_dir)  # blocking; `jfail annotate RUN_DIR`
    annotation_reviews(run_dir)     # majority labels and agreement -> [Review] for the correction

`run_dir/annotation/` holds the images and `labels.csv` of `FileAnnotator.export`, the class
names in `classes.json` and the votes in the SQLite database `votes.sqlite` (WAL mode, one row
per annotator, scenario and sample; a re-vote replaces the annotator's earlier vote).

The page is served by uvicorn (h11) with a Starlette application, bound to a loopback address
only; any number of servers may share one run directory (each vote is one SQLite transaction,
WAL mode, waiting up to 30 s for the write lock), so a restarted or second server loses and
duplicates nothing.

Annotators: a name is stored in normalized form, so that the same person typing it slightly
differently stays one annotator: Unicode NFKC, surrounding whitespace removed, every run of
inner whitespace made one space, then case-folded (" Mal  Reynolds " and "mal reynolds" are
the same annotator). A normalized name is 1 to 100 printable characters. Votes stored under a
name that is not in normalized form (earlier versions only stripped names) are renamed when a
server starts, keeping the newest vote where two spellings voted on one sample.

HTTP API (JSON; a request that is not understood gets a 4xx with `{"error": message}`):

    GET  /                                   the page (HTML, CSS and JS inline)
    GET  /api/next?annotator=NAME            the next image NAME has not voted on:
         {done: false, scenario, sample, image, classes, progress: {voted, total}}
         or {done: true, classes, progress} once NAME has voted on every image
    GET  /images/scenario_000/sample_00.png  an image listed in labels.csv (nothing else)
    POST /api/vote  {annotator, scenario, sample, label}   label: class index or -1 (none)
         -> 201 (new vote) or 200 (replaced) {ok: true, replaced, progress}
    GET  /api/summary                        counts: votes, annotators, samples with votes

HEAD works wherever GET does. Refused: an unknown path (404), another method (405, with
`Allow`), a Host header other than 127.0.0.1, localhost or [::1] (with this server's port or
none; 403), a request without exactly one Host header or whose absolute-form target names
another host (400), a vote that is not `Content-Type: application/json` (415), has no
Content-Length or has a Transfer-Encoding (411), declares more than 16 KiB (413), nests
arrays or objects, is not JSON, or has missing, unknown or mistyped fields (400). Requests
that are not valid HTTP/1.1 (a negative or non-numeric Content-Length, two different
lengths, an unfinished request head of more than 16 KiB) get uvicorn's plain-text 400 and
the connection is closed. A connection that leaves the server waiting longer than `timeout`
(5 s by default) for a request head is closed, and a vote body that takes longer gets 408;
past 256 open connections requests get 503 until some close. None of this writes to the
log; only a failure of the server itself does (500, logged once).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import errno
import functools
import importlib.resources
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import sqlite3
import threading
import time
import unicodedata
import urllib.parse
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import numpy as np

from jfail.defuse.annotate import (
    LABELS_FILE,
    NONE_OF_THE_ABOVE,
    FileAnnotator,
    Review,
    annotator_agreement,
    check_class_names,
    majority_label,
    reviews_from_labels,
)

__all__ = [
    "ANNOTATION_DIR",
    "VOTES_FILE",
    "CLASSES_FILE",
    "AnnotationServer",
    "prepare_annotation",
    "serve",
    "run_annotation_server",
    "load_votes",
    "annotation_reviews",
    "agreement_figure",
]

ANNOTATION_DIR = "annotation"
"""The folder of a run directory that holds the images, `labels.csv`, classes and votes."""
VOTES_FILE = "votes.sqlite"
CLASSES_FILE = "classes.json"

_LOG = logging.getLogger(__name__)
_PAGE_FILE = "annotation_page.html"
_MAX_BODY = 16 * 1024  # bytes of a vote's body
_MAX_NESTING = 2  # a vote is a flat object; deeper bodies are refused before parsing
_MAX_HEAD = 16 * 1024  # bytes of a request line and headers (h11 answers 400 beyond)
_MAX_NAME = 100
_MAX_CONNECTIONS = 256  # open connections beyond which requests get 503 until some close
_BACKLOG = 128
_TIMEOUT = 5.0  # seconds a connection may keep the server waiting (see `serve`)
_VOTE_KEYS = frozenset({"annotator", "scenario", "sample", "label"})


def prepare_annotation(
    run_dir,
    samples,
    predictions,
    class_names: Sequence[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Write `run_dir/annotation/` for the page; returns that folder.

    Writes the PNGs and `labels.csv` (`FileAnnotator.export`), `classes.json` and an empty vote
    database. A folder whose database already holds votes is never replaced (move or delete
    `votes.sqlite` first); an existing `labels.csv` only with `overwrite=True`.

    Args:
        run_dir: the run directory; the folder `annotation/` is made in it.
        samples: `[K, Q, H, W, C]` in [0, 1] (C = 1 or 3), the decoded samples of K scenarios.
        predictions: `[K, Q]` int, the classifier's classes.
        class_names: `[C']` the classes shown as buttons.
        overwrite: replace an existing `labels.csv` (never a database holding votes).

    Returns:
        The path of `run_dir/annotation`.

    Raises:
        FileExistsError: the vote database already holds votes, or `labels.csv` exists and
            `overwrite` is False.
        ValueError: bad samples, predictions or class names (see `FileAnnotator.export` and
            `check_class_names`).
    """
    directory = Path(run_dir) / ANNOTATION_DIR
    database = directory / VOTES_FILE
    if database.exists():
        count = _count_rows(database)
        if count:
            raise FileExistsError(
                f"{database} already holds {count} vote(s); move or delete it before preparing "
                "a new annotation round."
            )
    names = check_class_names(class_names)
    FileAnnotator.export(directory, samples, predictions, names, overwrite=overwrite)
    (directory / CLASSES_FILE).write_text(json.dumps({"classes": list(names)}, indent=2) + "\n")
    _init_database(database)
    return directory


class AnnotationServer:
    """The annotation page served in a background thread (from `serve`).

    url: `http://HOST:PORT/`; port: the bound port (useful with `port=0`); database: the path of
    `votes.sqlite`. `shutdown()` stops serving and frees the port; also a context manager.
    """

    def __init__(self, server, thread: threading.Thread, app: _App, host: str, port: int):
        self._server = server
        self._thread = thread
        self._app = app
        self.host = host
        self.port = int(port)
        self.database = app.database

    @property
    def url(self) -> str:
        """`http://HOST:PORT/`, the address of the annotation page."""
        return _url(self.host, self.port)

    def shutdown(self) -> None:
        """Stop the server and wait for its thread; votes already answered are on disk.

        Requests in progress are finished first (a connection still sending its request is
        dropped after the server's timeout); the port is free when this returns.
        """
        self._server.should_exit = True
        self._thread.join()

    def __enter__(self) -> AnnotationServer:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def serve(
    run_dir, *, host: str = "127.0.0.1", port: int = 0, timeout: float = _TIMEOUT
) -> AnnotationServer:
    """Serve the annotation page of `run_dir` in a background thread; returns once it listens.

    Args:
        run_dir: a run directory prepared by `prepare_annotation`.
        host: a loopback address (`127.0.0.1`, `::1` or `localhost`).
        port: the port to listen on; 0 picks a free port (see `.port` / `.url`).
        timeout: seconds a client may keep the server waiting: for a request head on a new or
            kept-alive connection (then the connection is closed) and for a vote's body (then
            408); a positive number.

    Returns:
        The running `AnnotationServer`; call `shutdown()` or use it as a context manager.

    Raises:
        ValueError: a host that is not a loopback address, a port outside [0, 65535], a timeout
            that is not a positive number, or a malformed `classes.json` or `labels.csv`.
        FileNotFoundError: `run_dir` has no prepared annotation round.
        OSError: the port cannot be bound (in use, privileged); the message says so.
        RuntimeError: the server did not start.
    """
    return _start(run_dir, host, port, timeout)


def run_annotation_server(
    run_dir, *, host: str = "127.0.0.1", port: int = 8765, open_browser: bool = False,
    timeout: float = _TIMEOUT,
) -> None:
    """Serve the annotation page of `run_dir` until Ctrl-C or SIGTERM (`jfail annotate RUN_DIR`).

    Prints the URL to open (and opens it with `open_browser=True`).

    Args:
        run_dir: a run directory prepared by `prepare_annotation`.
        host: a loopback address, as for `serve`.
        port: the port to listen on (0 picks a free one).
        open_browser: open the page in the default web browser.
        timeout: seconds a client may keep the server waiting, as for `serve`.

    Raises:
        ValueError, FileNotFoundError, OSError, RuntimeError: as for `serve`, before serving
            starts.
    """
    running = _start(run_dir, host, port, timeout)
    app = running._app
    summary = app.summary()
    print(
        f"Defuse annotation: {app.layout.num_scenarios} scenarios x "
        f"{app.layout.per_scenario} samples, {len(app.layout.classes)} classes, "
        f"{summary['votes']} vote(s) so far in {app.database}",
        flush=True,
    )
    print(f"Open {running.url} (each annotator types a name; Ctrl-C stops the server)",
          flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(running.url)
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # SIGINT too: a process started in the background by a script inherits SIGINT ignored,
        # and `kill -INT` (or Ctrl-C in a terminal) must still stop the server.
        previous = {number: signal.signal(number, lambda *_: stop.set())
                    for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        while running._thread.is_alive() and not stop.wait(0.25):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        running.shutdown()
        for number, handler in previous.items():
            signal.signal(number, handler)
    print(f"Stopped; {app.summary()['votes']} vote(s) in {app.database}", flush=True)


def load_votes(run_dir) -> list[list[np.ndarray]]:
    """Every sample's votes: `votes[k][q]` is a [V_kq] int array (ordered by annotator name).

    Each vote is a class index or `NONE_OF_THE_ABOVE`; V_kq = 0 for a sample nobody labelled
    yet. K, Q come from `run_dir/annotation/labels.csv`.

    Args:
        run_dir: a run directory prepared by `prepare_annotation`.

    Returns:
        A `K`-long list of `Q`-long lists of `[V_kq]` int64 arrays.

    Raises:
        FileNotFoundError: `run_dir` has no prepared annotation round.
        ValueError: a malformed `classes.json` or `labels.csv`, or a stored vote outside the
            round's scenarios, samples or classes.
    """
    layout = _load_layout(run_dir)
    return _read_votes(layout)


def annotation_reviews(
    run_dir, predictions=None, *, rho: float = 0.5, allow_missing: bool = False
) -> list[Review]:
    """One `Review` per scenario from the votes of the annotation page.

    A sample's label is the label a strict majority of its voters gave, else
    `NONE_OF_THE_ABOVE` (`majority_label`, for any number of voters per sample); a scenario's
    agreement is the mean over its samples of the fraction of voters that gave the sample's most
    common label (`annotator_agreement`, the paper's Figure 6).

    A sample without votes is a ValueError naming how many are missing, unless
    `allow_missing=True`: then unvoted samples are left out of their scenario's review (its
    `sample_labels` and `predictions` get shorter), and a scenario with no voted sample gets
    label `NONE_OF_THE_ABOVE`, NaN disagreement and agreement, and is no failure.

    Args:
        run_dir: a run directory prepared by `prepare_annotation`.
        predictions: `[K, Q]` int, the classifier's classes, by default those in `labels.csv`.
        rho: see `reviews_from_labels`.
        allow_missing: review only the voted samples instead of raising.

    Returns:
        One `Review` per scenario, in order.

    Raises:
        FileNotFoundError: `run_dir` has no prepared annotation round.
        ValueError: `predictions` not `[K, Q]`, a sample without votes (unless `allow_missing`),
            a malformed round, or bad `rho` (see `reviews_from_labels`).
    """
    layout = _load_layout(run_dir)
    shape = (layout.num_scenarios, layout.per_scenario)
    if predictions is None:
        predictions = layout.predictions
    predictions = np.asarray(predictions)
    if predictions.shape != shape:
        raise ValueError(f"predictions must be [K, Q] = {shape}, got shape {predictions.shape}.")
    votes = _read_votes(layout)
    voted = np.array([[len(v) > 0 for v in row] for row in votes], dtype=bool)
    if not voted.all() and not allow_missing:
        missing = [(k, q) for k, q in zip(*np.nonzero(~voted))]
        shown = ", ".join(f"(scenario {k}, sample {q})" for k, q in missing[:5])
        raise ValueError(
            f"{len(missing)} of {voted.size} samples have no votes yet, e.g. {shown}"
            f"{' ...' if len(missing) > 5 else ''}; annotate them (jfail annotate) or pass "
            "allow_missing=True."
        )
    labels = _sample_majority(votes)
    agreement = _scenario_agreement(votes)
    if voted.all():
        return reviews_from_labels(labels, predictions, rho=rho, agreement=agreement)
    reviews = []
    for k in range(layout.num_scenarios):
        mask = voted[k]
        if not mask.any():
            reviews.append(Review(
                sample_labels=np.zeros(0, np.int64), predictions=np.zeros(0, np.int64),
                label=NONE_OF_THE_ABOVE, disagreement=math.nan, is_failure=False,
                agreement=math.nan,
            ))
            continue
        reviews += reviews_from_labels(
            labels[k][mask][None], predictions[k][mask][None], rho=rho,
            agreement=agreement[k : k + 1],
        )
    return reviews


def agreement_figure(reviews, path, *, title: str = "") -> Path:
    """The paper's Figure 6 for the annotation page's votes; saves a PNG and returns its path.

    Left: mean ± standard error of the per-scenario agreement over failure, non-failure and all
    scenarios; right: a histogram of the per-scenario agreement. Scenarios with NaN agreement (no
    votes) are left out.

    Args:
        reviews: a list of `Review` (e.g. `annotation_reviews`), or a run directory whose votes
            are read with `annotation_reviews(..., allow_missing=True)`.
        path: the PNG to write.
        title: the figure's title (empty: "annotator agreement (Figure 6)").

    Returns:
        The path of the saved PNG.

    Raises:
        TypeError: `reviews` is neither a list of `Review` nor a run directory.
        ValueError: no scenario has an agreement value.
        FileNotFoundError: a run directory without a prepared annotation round.
    """
    from jfail.plotting import pyplot, save_figure

    if isinstance(reviews, (str, os.PathLike)):
        reviews = annotation_reviews(reviews, allow_missing=True)
    reviews = list(reviews)
    if not all(isinstance(r, Review) for r in reviews):
        raise TypeError("agreement_figure takes a list of Review or a run directory.")
    agreement = np.array([r.agreement for r in reviews], np.float64)
    failure = np.array([r.is_failure for r in reviews], bool)
    known = np.isfinite(agreement)
    if not known.any():
        raise ValueError("no scenario has an agreement value (no votes yet, or reviews without "
                         "per-voter labels).")
    agreement, failure = agreement[known], failure[known]
    groups = [("failure", agreement[failure]), ("non-failure", agreement[~failure]),
              ("all", agreement)]

    plt = pyplot()
    fig, (bars, hist) = plt.subplots(1, 2, figsize=(8, 3.4))
    means = [float(g.mean()) if g.size else 0.0 for _, g in groups]
    errors = [float(g.std(ddof=1) / np.sqrt(g.size)) if g.size > 1 else 0.0 for _, g in groups]
    positions = np.arange(len(groups))
    bars.bar(positions, means, yerr=errors, capsize=4,
             color=["crimson", "steelblue", "dimgray"], alpha=0.85)
    for x, (_, g), m, e in zip(positions, groups, means, errors):
        bars.text(x, min(m + e, 1.0) + 0.03, f"n={g.size}", ha="center", fontsize=8)
    bars.set_xticks(positions, [name for name, _ in groups])
    bars.set_ylim(0, 1.12)
    bars.set_ylabel("annotator agreement")
    bars.set_title("mean ± s.e. over scenarios", fontsize=9)
    edges = np.linspace(0, 1, 11)
    hist.hist([agreement[failure], agreement[~failure]], bins=edges, stacked=True,
              color=["crimson", "steelblue"], label=["failure", "non-failure"])
    hist.set_xlabel("fraction of voters giving the majority label")
    hist.set_ylabel("scenarios")
    hist.yaxis.get_major_locator().set_params(integer=True)
    hist.legend(fontsize=8)
    hist.set_title("per-scenario agreement", fontsize=9)
    fig.suptitle(title or "annotator agreement (Figure 6)", fontsize=10)
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Private helpers: the run's layout, the vote database, the HTTP server and the page.


@dataclass(frozen=True)
class _Layout:
    """What `prepare_annotation` wrote: folder, classes, images by (k, q), predictions [K, Q]."""

    directory: Path
    classes: tuple[str, ...]
    files: dict[tuple[int, int], str]
    predictions: np.ndarray
    num_scenarios: int
    per_scenario: int

    @property
    def database(self) -> Path:
        return self.directory / VOTES_FILE

    @property
    def total(self) -> int:
        return self.num_scenarios * self.per_scenario


def _load_layout(run_dir) -> _Layout:
    directory = Path(run_dir) / ANNOTATION_DIR
    csv_path, classes_path = directory / LABELS_FILE, directory / CLASSES_FILE
    for required in (csv_path, classes_path):
        if not required.is_file():
            raise FileNotFoundError(
                f"{required} is missing: {run_dir} has no prepared annotation round (see "
                "jfail.defuse.prepare_annotation)."
            )
    try:
        classes = json.loads(classes_path.read_text())["classes"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{classes_path} must be {{\"classes\": [names]}}: {error}") from None
    classes = check_class_names(classes)
    index = {name: i for i, name in enumerate(classes)}
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    files, predicted = {}, {}
    for line, row in enumerate(rows, start=2):
        try:
            key = (int(row["scenario"]), int(row["sample"]))
            name, prediction = row["file"], index[row["prediction"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{csv_path} line {line} is malformed: {row}") from None
        if key in files or min(key) < 0:
            raise ValueError(f"{csv_path} line {line}: bad or repeated sample {key}.")
        files[key], predicted[key] = name, prediction
    if not files:
        raise ValueError(f"{csv_path} lists no samples.")
    num_scenarios = max(k for k, _ in files) + 1
    per_scenario = max(q for _, q in files) + 1
    if len(files) != num_scenarios * per_scenario:
        raise ValueError(f"{csv_path} must list every (scenario, sample) of a "
                         f"{num_scenarios} x {per_scenario} grid, found {len(files)} rows.")
    predictions = np.empty((num_scenarios, per_scenario), np.int64)
    for key, value in predicted.items():
        predictions[key] = value
    return _Layout(directory.resolve(), classes, files, predictions, num_scenarios, per_scenario)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS votes (
    annotator TEXT NOT NULL,
    scenario INTEGER NOT NULL,
    sample INTEGER NOT NULL,
    label INTEGER NOT NULL,
    voted_at REAL NOT NULL,
    PRIMARY KEY (annotator, scenario, sample)
)
"""


def _connect(database: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), waiting up to 30 s on locks."""
    return sqlite3.connect(database, timeout=30.0, isolation_level=None)


def _init_database(database: Path) -> None:
    with contextlib.closing(_connect(database)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(_SCHEMA)


def _count_rows(database: Path) -> int:
    with contextlib.closing(_connect(database)) as connection:
        try:
            return int(connection.execute("SELECT COUNT(*) FROM votes").fetchone()[0])
        except sqlite3.OperationalError:  # no table yet
            return 0


def _read_votes(layout: _Layout) -> list[list[np.ndarray]]:
    if not layout.database.exists():
        rows = []
    else:
        with contextlib.closing(_connect(layout.database)) as connection:
            rows = connection.execute(
                "SELECT scenario, sample, label FROM votes ORDER BY scenario, sample, annotator"
            ).fetchall()
    collected = [[[] for _ in range(layout.per_scenario)] for _ in range(layout.num_scenarios)]
    for k, q, label in rows:
        if (k, q) not in layout.files or not NONE_OF_THE_ABOVE <= label < len(layout.classes):
            raise ValueError(f"{layout.database} holds a vote (scenario {k}, sample {q}, label "
                             f"{label}) that does not fit {layout.directory / LABELS_FILE}.")
        collected[k][q].append(label)
    return [[np.asarray(v, np.int64) for v in row] for row in collected]


def _sample_majority(votes: list[list[np.ndarray]]) -> np.ndarray:
    """[K, Q] strict-majority labels (`majority_label`, grouped by number of voters)."""
    labels = np.full((len(votes), len(votes[0])), NONE_OF_THE_ABOVE, np.int64)
    by_count = defaultdict(list)
    for k, row in enumerate(votes):
        for q, v in enumerate(row):
            if len(v):
                by_count[len(v)].append((k, q))
    for keys in by_count.values():
        result = majority_label(np.stack([votes[k][q] for k, q in keys]))
        for (k, q), value in zip(keys, result):
            labels[k, q] = value
    return labels


def _scenario_agreement(votes: list[list[np.ndarray]]) -> np.ndarray:
    """[K] mean over voted samples of `annotator_agreement`; NaN for a scenario without votes."""
    return np.array([
        np.mean([annotator_agreement(v[None]) for v in row if len(v)])
        if any(len(v) for v in row) else math.nan
        for row in votes
    ])


def _check_host(host: str) -> str:
    """The address to bind: loopback only."""
    address = "127.0.0.1" if host == "localhost" else host
    try:
        loopback = ipaddress.ip_address(address).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the annotation page only listens on loopback (127.0.0.1, ::1, "
                         f"localhost), not {host!r}.")
    return address


def _check_port(port) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in [0, 65535] (0 picks a free port), "
                         f"got {port!r}.")
    return port


def _check_timeout(timeout) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            0 < timeout < math.inf):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    return float(timeout)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _normalized_annotator(name: str) -> str:
    """The stored form of an annotator name (see the module docstring)."""
    return " ".join(unicodedata.normalize("NFKC", name).split()).casefold()


def _valid_annotator(name: str) -> bool:
    return 0 < len(name) <= _MAX_NAME and name.isprintable()


class _BadRequest(Exception):
    """A request the server refuses: answered with `status` and `{"error": message}`."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict | None = None,
                 *, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})
        if close:  # the body was not read: end the connection rather than parse what follows
            self.headers["Connection"] = "close"


def _check_annotator(name: str) -> str:
    normalized = _normalized_annotator(name)
    if not normalized:
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "an annotator name is required")
    if not _valid_annotator(normalized):
        raise _BadRequest(HTTPStatus.BAD_REQUEST,
                          f"an annotator name is at most {_MAX_NAME} printable characters")
    return normalized


class _App:
    """The server's state: the layout, the database and the lock that serialises its writes.

    The lock only orders this server's own writes; other servers on the same database are
    ordered by SQLite (`BEGIN IMMEDIATE` under WAL, waiting up to 30 s for the write lock).
    """

    def __init__(self, layout: _Layout):
        self.layout = layout
        self.database = layout.database
        self.write_lock = threading.Lock()
        _init_database(self.database)
        _normalize_stored_names(self.database)

    def progress(self, connection, annotator: str) -> dict:
        voted = connection.execute(
            "SELECT COUNT(*) FROM votes WHERE annotator = ?", (annotator,)).fetchone()[0]
        return {"voted": int(voted), "total": self.layout.total}

    def next_item(self, annotator: str) -> dict:
        layout = self.layout
        with contextlib.closing(_connect(self.database)) as connection:
            done = set(connection.execute(
                "SELECT scenario, sample FROM votes WHERE annotator = ?", (annotator,)))
            progress = self.progress(connection, annotator)
        item = {"done": True, "classes": list(layout.classes), "progress": progress}
        for k in range(layout.num_scenarios):
            for q in range(layout.per_scenario):
                if (k, q) not in done:
                    return {**item, "done": False, "scenario": k, "sample": q,
                            "image": "/images/" + urllib.parse.quote(layout.files[k, q])}
        return item

    def vote(self, annotator: str, scenario: int, sample: int, label: int) -> tuple[bool, dict]:
        """Record (replace) one vote in its own transaction; (replaced, progress)."""
        with self.write_lock, contextlib.closing(_connect(self.database)) as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                replaced = connection.execute(
                    "SELECT 1 FROM votes WHERE annotator = ? AND scenario = ? AND sample = ?",
                    (annotator, scenario, sample)).fetchone() is not None
                connection.execute(
                    "INSERT OR REPLACE INTO votes (annotator, scenario, sample, label, voted_at) "
                    "VALUES (?, ?, ?, ?, ?)", (annotator, scenario, sample, label, time.time()))
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            return replaced, self.progress(connection, annotator)

    def summary(self) -> dict:
        with contextlib.closing(_connect(self.database)) as connection:
            votes = connection.execute("SELECT COUNT(*) FROM votes").fetchone()[0]
            annotators = dict(connection.execute(
                "SELECT annotator, COUNT(*) FROM votes GROUP BY annotator ORDER BY annotator"))
            samples = connection.execute(
                "SELECT COUNT(*) FROM (SELECT DISTINCT scenario, sample FROM votes)").fetchone()[0]
        layout = self.layout
        return {"scenarios": layout.num_scenarios, "samples_per_scenario": layout.per_scenario,
                "classes": list(layout.classes), "votes": int(votes), "annotators": annotators,
                "samples_with_votes": int(samples),
                "samples_without_votes": layout.total - int(samples)}

    def image(self, relative: str) -> Path | None:
        """The file behind `/images/<relative>` if labels.csv lists it, else None."""
        if relative not in set(self.layout.files.values()):
            return None
        file = (self.layout.directory / relative).resolve()
        if not file.is_relative_to(self.layout.directory) or not file.is_file():
            return None
        return file


def _normalize_stored_names(database: Path) -> None:
    """Rename votes stored under names that are not in normalized form (earlier versions only
    stripped names): one annotator's votes end up under one name, the newest vote per sample."""
    with contextlib.closing(_connect(database)) as connection:

        def stale():
            names = [name for (name,) in connection.execute("SELECT DISTINCT annotator FROM votes")]
            renamed = {name: _normalized_annotator(name) for name in names}
            return {old: new for old, new in renamed.items()
                    if new != old and _valid_annotator(new)}

        if not stale():
            return
        connection.execute("BEGIN IMMEDIATE")
        try:
            for old, new in stale().items():
                for k, q, label, at in connection.execute(
                        "SELECT scenario, sample, label, voted_at FROM votes WHERE annotator = ?",
                        (old,)).fetchall():
                    kept = connection.execute(
                        "SELECT voted_at FROM votes WHERE annotator = ? AND scenario = ? AND "
                        "sample = ?", (new, k, q)).fetchone()
                    if kept is None or kept[0] < at:
                        connection.execute(
                            "INSERT OR REPLACE INTO votes (annotator, scenario, sample, label, "
                            "voted_at) VALUES (?, ?, ?, ?, ?)", (new, k, q, label, at))
                connection.execute("DELETE FROM votes WHERE annotator = ?", (old,))
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise


# ---------------------------------------------------------------- serving (uvicorn + Starlette)


def _listen(address: str, port: int) -> socket.socket:
    """A listening socket on (address, port); an OSError that says what to do if it is taken."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(_BACKLOG)
    except OSError as error:
        sock.close()
        where = _url(address, port).rstrip("/")
        if error.errno == errno.EADDRINUSE:
            reason = (f"port {port} is already in use (another annotation server?); stop "
                      "that program or choose another port")
        else:
            reason = error.strerror or str(error)
        raise OSError(error.errno, f"cannot listen on {where}: {reason}") from None
    return sock


@functools.lru_cache(maxsize=1)
def _protocol_class():
    """uvicorn's h11 protocol with a deadline on the client while no request is being served.

    uvicorn closes a keep-alive connection that stays silent for `timeout_keep_alive` after a
    response, but waits forever for the first request of a connection and for a request head
    that arrives a byte at a time. Here the same timeout runs from the moment a connection opens
    or a response completes until the next complete request head, whatever trickles in
    meanwhile; a request body is bounded by the application (408).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class _DeadlineProtocol(H11Protocol):
        _deadline = None
        _waiting_cycle = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._deadline is not None and self.cycle is not self._waiting_cycle:
                self._disarm()  # a new request head arrived: the application's limits apply

        def on_response_complete(self) -> None:
            cycle = self.cycle
            super().on_response_complete()
            if self.cycle is cycle:  # no pipelined request started
                self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self._waiting_cycle = self.cycle
                self._deadline = self.loop.call_later(self.timeout_keep_alive, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.cycle is self._waiting_cycle and not self.transport.is_closing():
                with contextlib.suppress(h11.LocalProtocolError):
                    self.conn.send(h11.ConnectionClosed())
                self.transport.close()

    return _DeadlineProtocol


_HOST = re.compile(r"(127\.0\.0\.1|localhost|\[::1\])(?::([0-9]{1,5}))?", re.IGNORECASE)
_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'")


@functools.lru_cache(maxsize=1)
def _response_class():
    """Starlette's Response, sending header names capitalised (`Content-Type`, not
    `content-type`) as the page always did, for clients that look names up exactly."""
    from starlette.responses import Response

    class _Response(Response):
        async def __call__(self, scope, receive, send):
            async def capitalised(message):
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [
                        (b"-".join(part.capitalize() for part in name.split(b"-")), value)
                        for name, value in message["headers"]]}
                await send(message)

            await super().__call__(scope, receive, capitalised)

    return _Response


def _response(status: int, body: bytes, content_type: str, *, cache: str = "no-store",
              headers: dict | None = None):
    """A Starlette response (header names capitalised as they always were on the wire)."""
    extra = {"Cache-Control": cache, "X-Content-Type-Options": "nosniff"}
    if content_type.startswith("text/html"):
        extra["Content-Security-Policy"] = _CSP
    extra.update(headers or {})
    return _response_class()(body, status_code=int(status), headers=extra,
                             media_type=content_type)


def _json(status: int, payload: dict, headers: dict | None = None):
    return _response(status, json.dumps(payload).encode(), "application/json", headers=headers)


@functools.lru_cache(maxsize=1)
def _page() -> bytes:
    return importlib.resources.files("jfail.defuse").joinpath(_PAGE_FILE).read_bytes()


class _HostGuard:
    """ASGI middleware refusing requests not addressed to this loopback server (DNS rebinding).

    Every request needs exactly one Host header naming 127.0.0.1, localhost or [::1] (with this
    server's port, or none); a request line in absolute form (`GET http://host:port/path`) must
    name such a host too, and is then served as its path. Anything the guard does not let
    through, or that fails inside the application, is answered here with the JSON error shape.
    """

    def __init__(self, app, port: int):
        self.app, self.port = app, port

    def allowed(self, host: str) -> bool:
        match = _HOST.fullmatch(host)
        return match is not None and match[2] in (None, str(self.port))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # uvicorn runs without lifespan and websockets
            return
        started = False

        async def tracked_send(message):
            nonlocal started
            started = True
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                await _json(refusal.status, {"error": refusal.message})(scope, receive, send)
                return
            await self.app(scope, receive, tracked_send)
        except Exception as error:  # a bug or a database fault: report it, keep serving
            if not getattr(error, "logged_by_jfail", False):
                _LOG.exception("annotation server: %s %s failed", scope.get("method"),
                               scope.get("path"))
            if not started:
                await _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})(
                    scope, receive, send)

    def refusal(self, scope) -> _BadRequest | None:
        hosts = [value.decode("latin-1") for name, value in scope["headers"] if name == b"host"]
        if len(hosts) != 1:
            return _BadRequest(HTTPStatus.BAD_REQUEST,
                               f"a request needs exactly one Host header, got {len(hosts)}")
        if not self.allowed(hosts[0]):
            return _BadRequest(HTTPStatus.FORBIDDEN,
                               f"Host {hosts[0]!r} is not this loopback server")
        target = scope.get("raw_path") or scope["path"].encode()
        if not target.startswith(b"/"):
            url = urllib.parse.urlsplit(target.decode("latin-1"))
            if url.scheme.lower() != "http" or not self.allowed(url.netloc) or \
                    not url.path.startswith("/"):
                shown = target[:200].decode("latin-1")
                return _BadRequest(HTTPStatus.BAD_REQUEST,
                                   f"the request target {shown!r} is not a path on this "
                                   "loopback server")
            scope["raw_path"] = url.path.encode("latin-1")
            scope["path"] = urllib.parse.unquote(url.path)
        return None


def _application(app: _App, port: int, timeout: float):
    """The ASGI application: Starlette routes behind `_HostGuard`."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.routing import Route

    async def page(request):
        return _response(HTTPStatus.OK, _page(), "text/html; charset=utf-8")

    def next_item(request):
        values = request.query_params.getlist("annotator")
        if len(values) != 1:
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "give exactly one ?annotator=NAME")
        return _json(HTTPStatus.OK, app.next_item(_check_annotator(values[0])))

    def summary(request):
        return _json(HTTPStatus.OK, app.summary())

    def image(request):
        relative = request.path_params["path"]
        file = app.image(relative)
        if file is None:
            raise _BadRequest(HTTPStatus.NOT_FOUND, f"no such image: /images/{relative}")
        return _response(HTTPStatus.OK, file.read_bytes(), "image/png",
                         cache="private, max-age=3600")

    async def vote(request):
        body = await _read_body(request)
        annotator, scenario, sample, label = _parse_vote(body, app.layout)
        replaced, progress = await run_in_threadpool(app.vote, annotator, scenario, sample, label)
        return _json(HTTPStatus.OK if replaced else HTTPStatus.CREATED,
                     {"ok": True, "replaced": replaced, "progress": progress})

    async def _read_body(request) -> bytes:
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise _BadRequest(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                              "a vote must be sent as Content-Type: application/json", close=True)
        length = request.headers.get("content-length")
        if length is None or "transfer-encoding" in request.headers:
            raise _BadRequest(HTTPStatus.LENGTH_REQUIRED,
                              "a vote needs a Content-Length (and no Transfer-Encoding)",
                              close=True)
        if not length.isdigit():  # uvicorn's h11 refuses these before they get here
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "Content-Length is not a number",
                              close=True)
        if int(length) > _MAX_BODY:
            raise _BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"a vote is at most {_MAX_BODY} bytes", close=True)
        chunks = []

        async def read():
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > _MAX_BODY:  # more than declared: h11 should have refused it already
                    raise _BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                      f"a vote is at most {_MAX_BODY} bytes", close=True)
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), timeout)
        except asyncio.TimeoutError:
            raise _BadRequest(HTTPStatus.REQUEST_TIMEOUT,
                              f"the vote did not arrive within {timeout:g} s", close=True) from None
        except ClientDisconnect:
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "the connection closed mid-request",
                              close=True) from None
        return b"".join(chunks)

    async def bad_request(request, error: _BadRequest):
        return _json(error.status, {"error": error.message}, error.headers)

    async def http_error(request, error: HTTPException):
        path = request.url.path
        if error.status_code == HTTPStatus.NOT_FOUND:
            return _json(error.status_code, {"error": f"no such page: {path}"})
        if error.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
            allow = (error.headers or {}).get("Allow", "")
            allowed = ", ".join(sorted(m for m in allow.split(", ") if m and m != "HEAD"))
            return _json(error.status_code,
                         {"error": f"{request.method} is not allowed on {path}; use {allowed}"},
                         {"Allow": allowed})
        return _json(error.status_code, {"error": str(error.detail)})

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/index.html", page, methods=["GET"]),
        Route("/api/next", next_item, methods=["GET"]),
        Route("/api/summary", summary, methods=["GET"]),
        Route("/api/vote", vote, methods=["POST"]),
        Route("/images/{path:path}", image, methods=["GET"]),
    ]
    async def server_error(request, error: Exception):  # logged before the client hears
        _LOG.error("annotation server: %s %s failed", request.method, request.url.path,
                   exc_info=error)
        error.logged_by_jfail = True  # Starlette re-raises it to _HostGuard
        return _json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})

    starlette = Starlette(routes=routes, exception_handlers={
        _BadRequest: bad_request, HTTPException: http_error, Exception: server_error})
    starlette.router.redirect_slashes = False  # an unknown path is a 404, not a redirect
    return _HostGuard(starlette, port)


def _parse_vote(raw: bytes, layout: _Layout) -> tuple[str, int, int, int]:
    """(annotator, scenario, sample, label) of a vote's body; a _BadRequest if it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "the body is not valid JSON") from None
    if _nesting(text) > _MAX_NESTING:
        raise _BadRequest(HTTPStatus.BAD_REQUEST,
                          "a vote is one flat JSON object {annotator, scenario, sample, label}")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "a vote is a JSON object")
    unknown, absent = set(body) - _VOTE_KEYS, _VOTE_KEYS - set(body)
    if unknown or absent:
        raise _BadRequest(HTTPStatus.BAD_REQUEST,
                          "a vote has exactly the fields annotator, scenario, sample, label"
                          f" (missing: {sorted(absent)}, unknown: {sorted(unknown)[:10]})")
    if not isinstance(body["annotator"], str):
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "annotator must be a string")
    annotator = _check_annotator(body["annotator"])
    for field in ("scenario", "sample", "label"):
        if type(body[field]) is not int:
            raise _BadRequest(HTTPStatus.BAD_REQUEST, f"{field} must be an integer")
    scenario, sample, label = body["scenario"], body["sample"], body["label"]
    if (scenario, sample) not in layout.files:
        raise _BadRequest(HTTPStatus.BAD_REQUEST,
                          f"no sample {sample} of scenario {scenario} (the run has "
                          f"{layout.num_scenarios} scenarios of {layout.per_scenario})")
    if not NONE_OF_THE_ABOVE <= label < len(layout.classes):
        raise _BadRequest(HTTPStatus.BAD_REQUEST,
                          f"label must be a class index in [0, {len(layout.classes)}) or "
                          f"{NONE_OF_THE_ABOVE} (none of the above), got {label}")
    return annotator, scenario, sample, label


def _nesting(text: str) -> int:
    """How deeply the arrays and objects of a JSON text nest (brackets inside strings aside),
    found in one pass without parsing, so that no input reaches the parser's recursion limit."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _start(run_dir, host: str, port: int, timeout: float) -> AnnotationServer:
    """Check the arguments, open the database, bind, and serve in a background thread."""
    import uvicorn

    address, port, timeout = _check_host(host), _check_port(port), _check_timeout(timeout)
    app = _App(_load_layout(run_dir))
    sock = _listen(address, port)
    bound = int(sock.getsockname()[1])
    config = uvicorn.Config(
        _application(app, bound, timeout), host=address, port=bound, loop="asyncio",
        http=_protocol_class(), ws="none", lifespan="off", interface="asgi3",
        log_config=None, log_level=logging.ERROR, access_log=False,  # no line per bad request
        proxy_headers=False, server_header=False,
        timeout_keep_alive=timeout, timeout_graceful_shutdown=max(1, math.ceil(timeout)),
        limit_concurrency=_MAX_CONNECTIONS, backlog=_BACKLOG,
        h11_max_incomplete_event_size=_MAX_HEAD,
    )
    server = uvicorn.Server(config)
    failure = []

    def run():
        try:
            server.run(sockets=[sock])
        except BaseException as error:  # noqa: BLE001 - reported by _start / shutdown
            failure.append(error)
        finally:
            sock.close()

    thread = threading.Thread(target=run, name="jfail-annotation-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    if not server.started:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()
        raise RuntimeError(f"the annotation server did not start: {failure or 'timed out'}")
    return AnnotationServer(server, thread, app, address, bound)
