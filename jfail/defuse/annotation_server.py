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

HTTP API (JSON; a request that is not understood gets a 4xx with `{"error": message}`):

    GET  /                                   the page (HTML, CSS and JS inline)
    GET  /api/next?annotator=NAME            the next image NAME has not voted on:
         {done: false, scenario, sample, image, classes, progress: {voted, total}}
         or {done: true, classes, progress} once NAME has voted on every image
    GET  /images/scenario_000/sample_00.png  an image listed in labels.csv (nothing else)
    POST /api/vote  {annotator, scenario, sample, label}   label: class index or -1 (none)
         -> 201 (new vote) or 200 (replaced) {ok: true, replaced, progress}
    GET  /api/summary                        counts: votes, annotators, samples with votes
"""

from __future__ import annotations

import contextlib
import csv
import ipaddress
import json
import logging
import math
import os
import socket
import sqlite3
import threading
import time
import urllib.parse
from collections import defaultdict
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence

import numpy as np

from jfail.defuse.annotate import (
    LABELS_FILE,
    NONE_OF_THE_ABOVE,
    FileAnnotator,
    Review,
    _check_class_names,
    annotator_agreement,
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
_MAX_BODY = 16 * 1024
_MAX_NAME = 100
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

    samples: [K, Q, H, W, C] in [0, 1] (C = 1 or 3), the decoded samples of K scenarios;
    predictions: [K, Q] int, the classifier's classes; class_names: [C'] the classes shown as
    buttons. Writes the PNGs and `labels.csv` (`FileAnnotator.export`), `classes.json` and an
    empty vote database. A folder whose database already holds votes is never replaced (move
    or delete `votes.sqlite` first); an existing `labels.csv` only with `overwrite=True`.
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
    names = _check_class_names(class_names)
    FileAnnotator.export(directory, samples, predictions, names, overwrite=overwrite)
    (directory / CLASSES_FILE).write_text(json.dumps({"classes": list(names)}, indent=2) + "\n")
    _init_database(database)
    return directory


class AnnotationServer:
    """The annotation page served in a background thread (from `serve`).

    url: `http://HOST:PORT/`; port: the bound port (useful with `port=0`); database: the path of
    `votes.sqlite`. `shutdown()` stops serving and frees the port; also a context manager.
    """

    def __init__(self, httpd: "_HTTPServer", thread: threading.Thread):
        self._httpd = httpd
        self._thread = thread
        self.host = httpd.server_address[0]
        self.port = int(httpd.server_address[1])
        self.database = httpd.app.database

    @property
    def url(self) -> str:
        return _url(self.host, self.port)

    def shutdown(self) -> None:
        """Stop the server and wait for its thread; votes already answered are on disk."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> "AnnotationServer":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def serve(run_dir, *, host: str = "127.0.0.1", port: int = 0) -> AnnotationServer:
    """Serve the annotation page of `run_dir` in a background thread; returns at once.

    host: a loopback address (`127.0.0.1`, `::1` or `localhost`), anything else is a
    ValueError; port: 0 picks a free port (see `.port` / `.url`).
    """
    httpd = _make_server(run_dir, host, port)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
        name="jfail-annotation-server", daemon=True,
    )
    thread.start()
    return AnnotationServer(httpd, thread)


def run_annotation_server(
    run_dir, *, host: str = "127.0.0.1", port: int = 8765, open_browser: bool = False
) -> None:
    """Serve the annotation page of `run_dir` until Ctrl-C (`jfail annotate RUN_DIR`).

    Prints the URL to open (and opens it with `open_browser=True`); see `serve` for `host`.
    """
    httpd = _make_server(run_dir, host, port)
    app = httpd.app
    url = _url(httpd.server_address[0], int(httpd.server_address[1]))
    summary = app.summary()
    print(
        f"Defuse annotation: {app.layout.num_scenarios} scenarios x "
        f"{app.layout.per_scenario} samples, {len(app.layout.classes)} classes, "
        f"{summary['votes']} vote(s) so far in {app.database}",
        flush=True,
    )
    print(f"Open {url} (each annotator types a name; Ctrl-C stops the server)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        httpd.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    print(f"Stopped; {app.summary()['votes']} vote(s) in {app.database}", flush=True)


def load_votes(run_dir) -> list[list[np.ndarray]]:
    """Every sample's votes: `votes[k][q]` is a [V_kq] int array (ordered by annotator name).

    Each vote is a class index or `NONE_OF_THE_ABOVE`; V_kq = 0 for a sample nobody labelled
    yet. K, Q come from `run_dir/annotation/labels.csv`.
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
    common label (`annotator_agreement`, the paper's Figure 6). predictions: [K, Q] int, the
    classifier's classes, by default those in `labels.csv`; rho: see `reviews_from_labels`.

    A sample without votes is a ValueError naming how many are missing, unless
    `allow_missing=True`: then unvoted samples are left out of their scenario's review (its
    `sample_labels` and `predictions` get shorter), and a scenario with no voted sample gets
    label `NONE_OF_THE_ABOVE`, NaN disagreement and agreement, and is no failure.
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

    reviews: a list of `Review` (e.g. `annotation_reviews`), or a run directory whose votes are
    read with `annotation_reviews(..., allow_missing=True)`. Left: mean ± standard error of the
    per-scenario agreement over failure, non-failure and all scenarios; right: a histogram of
    the per-scenario agreement. Scenarios with NaN agreement (no votes) are left out.
    """
    from jfail.defuse.plots import _pyplot, _save

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

    plt = _pyplot()
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
    return _save(fig, path)


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
    classes = _check_class_names(classes)
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


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class _App:
    """The server's state: the layout, the database and the lock that serialises writes."""

    def __init__(self, layout: _Layout):
        self.layout = layout
        self.database = layout.database
        self.write_lock = threading.Lock()
        _init_database(self.database)

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

    def image(self, path: str) -> Path | None:
        """The file behind `/images/<path>` if labels.csv lists it, else None."""
        relative = urllib.parse.unquote(path[len("/images/"):])
        if relative not in set(self.layout.files.values()):
            return None
        file = (self.layout.directory / relative).resolve()
        if not file.is_relative_to(self.layout.directory) or not file.is_file():
            return None
        return file


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    app: _App


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


def _make_server(run_dir, host: str, port: int) -> _HTTPServer:
    address = _check_host(host)
    if not isinstance(port, int) or not 0 <= port < 65536:
        raise ValueError(f"port must be an integer in [0, 65535], got {port!r}.")
    app = _App(_load_layout(run_dir))
    server_class = _HTTPServer
    if ":" in address:
        server_class = _HTTPServer6
    httpd = server_class((address, port), _Handler)
    httpd.app = app
    return httpd


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


_ROUTES = {"/": ("GET",), "/index.html": ("GET",), "/api/next": ("GET",),
           "/api/summary": ("GET",), "/api/vote": ("POST",)}
_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "[::1]", "::1"}


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "jfail-annotate"

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def log_message(self, format, *args):
        _LOG.debug("%s %s", self.address_string(), format % args)

    def _dispatch(self, method: str) -> None:
        try:
            self._check_host_header()
            path = urllib.parse.urlsplit(self.path).path
            allowed = ("GET",) if path.startswith("/images/") else _ROUTES.get(path)
            if allowed is None:
                raise _BadRequest(HTTPStatus.NOT_FOUND, f"no such page: {path}")
            if method not in allowed:
                raise _BadRequest(HTTPStatus.METHOD_NOT_ALLOWED,
                                  f"{method} is not allowed on {path}; use {', '.join(allowed)}",
                                  {"Allow": ", ".join(allowed)})
            app = self.server.app
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, _PAGE.encode(), "text/html; charset=utf-8")
            elif path == "/api/next":
                self._json(HTTPStatus.OK, app.next_item(self._annotator_param()))
            elif path == "/api/summary":
                self._json(HTTPStatus.OK, app.summary())
            elif path == "/api/vote":
                replaced, progress = app.vote(*self._vote_body())
                self._json(HTTPStatus.OK if replaced else HTTPStatus.CREATED,
                           {"ok": True, "replaced": replaced, "progress": progress})
            else:
                file = app.image(path)
                if file is None:
                    raise _BadRequest(HTTPStatus.NOT_FOUND, f"no such image: {path}")
                self._send(HTTPStatus.OK, file.read_bytes(), "image/png",
                           cache="private, max-age=3600")
        except _BadRequest as error:
            self._json(error.status, {"error": error.message}, error.headers)
        except Exception:  # a bug or a database error: report it, keep serving
            _LOG.exception("annotation server: %s %s failed", method, self.path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})

    def _check_host_header(self) -> None:
        """Refuse requests addressed to another host name (DNS rebinding)."""
        host = self.headers.get("Host")
        if host is None:
            return
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name.lower() not in _LOOPBACK_NAMES:
            raise _BadRequest(HTTPStatus.FORBIDDEN, f"Host {host!r} is not this loopback server")

    def _annotator_param(self) -> str:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query,
                                      keep_blank_values=True)
        values = query.get("annotator", [])
        if len(values) != 1:
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "give exactly one ?annotator=NAME")
        return _check_annotator(values[0])

    def _vote_body(self) -> tuple[str, int, int, int]:
        content_type = self.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise _BadRequest(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                              "a vote must be sent as Content-Type: application/json")
        length = self.headers.get("Content-Length")
        if length is None:
            raise _BadRequest(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        try:
            length = int(length)
        except ValueError:
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if not 0 <= length <= _MAX_BODY:
            raise _BadRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"a vote is at most {_MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "a vote is a JSON object")
        unknown, absent = set(body) - _VOTE_KEYS, _VOTE_KEYS - set(body)
        if unknown or absent:
            raise _BadRequest(HTTPStatus.BAD_REQUEST,
                              "a vote has exactly the fields annotator, scenario, sample, label"
                              f" (missing: {sorted(absent)}, unknown: {sorted(unknown)})")
        if not isinstance(body["annotator"], str):
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "annotator must be a string")
        annotator = _check_annotator(body["annotator"])
        layout = self.server.app.layout
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

    def _json(self, status: HTTPStatus, payload: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers=headers)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, *,
              cache: str = "no-store", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        if content_type.startswith("text/html"):
            self.send_header("Content-Security-Policy",
                             "default-src 'self'; img-src 'self' data:; "
                             "style-src 'unsafe-inline'; script-src 'unsafe-inline'")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _check_annotator(name: str) -> str:
    name = name.strip()
    if not name:
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "an annotator name is required")
    if len(name) > _MAX_NAME or not name.isprintable():
        raise _BadRequest(HTTPStatus.BAD_REQUEST,
                          f"an annotator name is at most {_MAX_NAME} printable characters")
    return name


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>Defuse annotation</title>
<style>
  [hidden] { display: none !important; }
  body { font-family: system-ui, sans-serif; margin: 0; background: #f6f6f4; color: #222; }
  main { max-width: 44rem; margin: 2rem auto; padding: 0 1rem; text-align: center; }
  h1 { font-size: 1.3rem; font-weight: 600; }
  #sample { width: 224px; height: 224px; image-rendering: pixelated; border: 1px solid #bbb;
            background: #fff; margin: 0.5rem auto 1rem; display: block; }
  #buttons { display: flex; flex-wrap: wrap; gap: 0.4rem; justify-content: center; }
  button { font: inherit; padding: 0.45rem 0.9rem; border: 1px solid #888; border-radius: 4px;
           background: #fff; cursor: pointer; }
  button:hover:not(:disabled) { background: #e8eef8; }
  button:disabled { opacity: 0.5; cursor: default; }
  #none { margin-top: 0.8rem; }
  #progress { color: #555; }
  #error { color: #b00020; }
  input { font: inherit; padding: 0.35rem; }
</style>
</head>
<body data-state="login">
<main>
  <h1>Which class does this image show?</h1>
  <form id="login">
    <label>Your name <input id="annotator" name="annotator" maxlength="100"
      autocomplete="username" required></label>
    <button type="submit" id="start">Start</button>
  </form>
  <section id="task" hidden>
    <p id="progress" aria-live="polite"></p>
    <img id="sample" alt="a generated sample to label">
    <div id="buttons"></div>
    <button type="button" id="none" class="label" data-label="-1">None of the above</button>
    <p><small>Keys: 0&ndash;9 pick a class, n is none of the above.</small></p>
  </section>
  <p id="done" hidden>You have labelled every image &mdash; thank you.</p>
  <p id="error" role="alert" hidden></p>
</main>
<script>
"use strict";
const state = { annotator: null, item: null, classes: null };
const $ = (id) => document.getElementById(id);
const setState = (name) => { document.body.dataset.state = name; };

function showError(error) {
  $("error").textContent = String(error.message || error);
  $("error").hidden = false;
  setState("error");
}

async function api(url, options) {
  const response = await fetch(url, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function buildButtons(classes) {
  const box = $("buttons");
  box.replaceChildren();
  classes.forEach((name, index) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "label";
    button.dataset.label = String(index);
    button.textContent = name;
    box.appendChild(button);
  });
}

function setEnabled(enabled) {
  document.querySelectorAll("button.label").forEach((b) => { b.disabled = !enabled; });
}

function showProgress(progress) {
  $("progress").textContent =
    `${state.annotator}: ${progress.voted} / ${progress.total} labelled`;
}

function loadImage(img, src) {
  if (img.getAttribute("src") === src && img.complete) return Promise.resolve();
  return new Promise((resolve, reject) => {
    img.onload = () => resolve();
    img.onerror = () => reject(new Error("the image did not load"));
    img.src = src;
  });
}

async function next() {
  setEnabled(false);
  setState("loading");
  const item = await api(`/api/next?annotator=${encodeURIComponent(state.annotator)}`);
  if (!state.classes) { state.classes = item.classes; buildButtons(item.classes); }
  showProgress(item.progress);
  if (item.done) {
    state.item = null;
    $("task").hidden = true;
    $("done").hidden = false;
    setState("done");
    return;
  }
  state.item = item;
  const img = $("sample");
  img.dataset.scenario = String(item.scenario);
  img.dataset.sample = String(item.sample);
  await loadImage(img, item.image);
  setEnabled(true);
  setState("ready");
}

async function vote(label) {
  if (!state.item || document.body.dataset.state !== "ready") return;
  setEnabled(false);
  setState("saving");
  const { scenario, sample } = state.item;
  const result = await api("/api/vote", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ annotator: state.annotator, scenario, sample, label }),
  });
  showProgress(result.progress);
  await next();
}

function start(name) {
  name = name.trim();
  if (!name) return;
  state.annotator = name;
  const url = new URL(location.href);
  url.searchParams.set("annotator", name);
  history.replaceState(null, "", url);
  $("login").hidden = true;
  $("task").hidden = false;
  next().catch(showError);
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button.label");
  if (button && !button.disabled) vote(Number(button.dataset.label)).catch(showError);
});
document.addEventListener("keydown", (event) => {
  if (!state.classes || event.target instanceof HTMLInputElement) return;
  if (event.key === "n") vote(-1).catch(showError);
  else if (/^[0-9]$/.test(event.key) && Number(event.key) < state.classes.length)
    vote(Number(event.key)).catch(showError);
});
$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  start($("annotator").value);
});
const initial = new URLSearchParams(location.search).get("annotator");
if (initial && initial.trim()) { $("annotator").value = initial; start(initial); }
</script>
</body>
</html>
"""
