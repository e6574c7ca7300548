"""Tests for jfail.defuse.annotation_server: the Defuse annotation page, its votes and reviews."""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from jfail.defuse import (
    NONE_OF_THE_ABOVE,
    agreement_figure,
    annotation_reviews,
    annotator_agreement,
    load_votes,
    majority_label,
    prepare_annotation,
    serve,
)
from jfail.defuse.annotation_server import VOTES_FILE
from jfail.testing import http_probe
from jfail.testing.http_probe import (
    GOOD,
    JSON,
    ServerProcess,
    exchange,
    hostile,
    raw_request,
    truncated,
    vote_until_acknowledged,
    voting_jobs,
)

sys.path.insert(0, str(Path(__file__).parent))
from browser import chromium  # noqa: E402

K, Q = 3, 2
CLASSES = ("zero", "one", "two", "three")
PREDICTIONS = np.array([[0, 0], [1, 1], [2, 3]])


@pytest.fixture
def run_dir(tmp_path):
    samples = np.random.default_rng(0).uniform(size=(K, Q, 28, 28, 1)).astype(np.float32)
    prepare_annotation(tmp_path, samples, PREDICTIONS, CLASSES)
    return tmp_path


@pytest.fixture
def server(run_dir):
    with serve(run_dir) as running:
        yield running


def request(server, method, path, body=None, headers=None):
    """(status, parsed JSON or raw bytes, response headers) of one raw HTTP request."""
    return http_probe.request(server.port, method, path, body, headers)


def vote(server, annotator, scenario, sample, label):
    return request(server, "POST", "/api/vote", {"annotator": annotator, "scenario": scenario,
                                                 "sample": sample, "label": label})


def rows(run_dir):
    """Every vote in the database as {(annotator, scenario, sample): label}."""
    with sqlite3.connect(run_dir / "annotation" / VOTES_FILE) as connection:
        found = connection.execute("SELECT annotator, scenario, sample, label FROM votes")
        return {(a, k, q): label for a, k, q, label in found}


# ---------------------------------------------------------------- preparing a run


def test_prepare_writes_images_classes_and_an_empty_database(run_dir):
    folder = run_dir / "annotation"
    assert json.loads((folder / "classes.json").read_text()) == {"classes": list(CLASSES)}
    assert sorted(p.name for p in (folder / "scenario_002").iterdir()) == [
        "sample_00.png", "sample_01.png"]
    assert (folder / "labels.csv").read_text().splitlines()[0] == \
        "scenario,sample,file,prediction,label"
    with sqlite3.connect(folder / VOTES_FILE) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert rows(run_dir) == {}
    votes = load_votes(run_dir)
    assert len(votes) == K and all(len(row) == Q and all(v.size == 0 for v in row)
                                   for row in votes)


def test_prepare_refuses_to_replace_votes(run_dir):
    samples = np.zeros((K, Q, 28, 28, 1), np.float32)
    with pytest.raises(FileExistsError, match="labels.csv"):
        prepare_annotation(run_dir, samples, PREDICTIONS, CLASSES)
    prepare_annotation(run_dir, samples, PREDICTIONS, CLASSES, overwrite=True)  # no votes yet
    with serve(run_dir) as server:
        assert vote(server, "ann", 0, 0, 1)[0] == 201
    with pytest.raises(FileExistsError, match="1 vote"):
        prepare_annotation(run_dir, samples, PREDICTIONS, CLASSES, overwrite=True)
    assert rows(run_dir) == {("ann", 0, 0): 1}


def test_serve_is_loopback_only_and_needs_a_prepared_run(run_dir, tmp_path_factory):
    for host in ("0.0.0.0", "192.168.1.10", "example.com", ""):
        with pytest.raises(ValueError, match="loopback"):
            serve(run_dir, host=host)
    with pytest.raises(FileNotFoundError, match="prepare_annotation"):
        serve(tmp_path_factory.mktemp("empty"))
    with serve(run_dir, host="localhost") as server:
        assert server.url == f"http://127.0.0.1:{server.port}/"


# ---------------------------------------------------------------- the HTTP API


def test_next_vote_revote_and_done(server, run_dir):
    status, item, _ = request(server, "GET", "/api/next?annotator=alice")
    assert status == 200 and item["done"] is False
    assert (item["scenario"], item["sample"]) == (0, 0)
    assert item["classes"] == list(CLASSES) and item["progress"] == {"voted": 0, "total": 6}
    status, png, headers = request(server, "GET", item["image"])
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert png == (run_dir / "annotation" / "scenario_000" / "sample_00.png").read_bytes()

    status, answer, _ = vote(server, "alice", 0, 0, 2)
    assert status == 201 and answer == {"ok": True, "replaced": False,
                                        "progress": {"voted": 1, "total": 6}}
    assert request(server, "GET", "/api/next?annotator=alice")[1]["sample"] == 1
    # another annotator still starts at the first image
    assert request(server, "GET", "/api/next?annotator=bob")[1]["sample"] == 0

    status, answer, _ = vote(server, "alice", 0, 0, NONE_OF_THE_ABOVE)  # a re-vote replaces
    assert status == 200 and answer["replaced"] is True and answer["progress"]["voted"] == 1
    assert rows(run_dir) == {("alice", 0, 0): -1}

    for k in range(K):
        for q in range(Q):
            vote(server, "alice", k, q, 1)
    status, item, _ = request(server, "GET", "/api/next?annotator=alice")
    assert status == 200 and item["done"] is True and item["progress"]["voted"] == 6
    status, summary, _ = request(server, "GET", "/api/summary")
    assert summary == {"scenarios": 3, "samples_per_scenario": 2, "classes": list(CLASSES),
                       "votes": 6, "annotators": {"alice": 6}, "samples_with_votes": 6,
                       "samples_without_votes": 0}
    status, page, headers = request(server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"None of the above" in page and b"http" not in page.split(b"<script>")[1]


BAD_REQUESTS = [
    # (method, path, body, headers, status)
    ("POST", "/api/vote", "{not json", JSON, 400),
    ("POST", "/api/vote", b"\xff\xfe", JSON, 400),
    ("POST", "/api/vote", [1, 2], None, 400),
    ("POST", "/api/vote", {k: v for k, v in GOOD.items() if k != "annotator"}, None, 400),
    ("POST", "/api/vote", {**GOOD, "annotator": "   "}, None, 400),
    ("POST", "/api/vote", {**GOOD, "annotator": 7}, None, 400),
    ("POST", "/api/vote", {**GOOD, "scenario": 3}, None, 400),
    ("POST", "/api/vote", {**GOOD, "sample": 2}, None, 400),
    ("POST", "/api/vote", {**GOOD, "scenario": -1}, None, 400),
    ("POST", "/api/vote", {**GOOD, "scenario": "0"}, None, 400),
    ("POST", "/api/vote", {**GOOD, "sample": True}, None, 400),
    ("POST", "/api/vote", {**GOOD, "label": 4}, None, 400),
    ("POST", "/api/vote", {**GOOD, "label": -2}, None, 400),
    ("POST", "/api/vote", {**GOOD, "label": 1.0}, None, 400),
    ("POST", "/api/vote", {**GOOD, "lable": 1}, None, 400),
    ("POST", "/api/vote", json.dumps(GOOD), {"Content-Type": "text/plain"}, 415),
    ("POST", "/api/vote", json.dumps(GOOD), {**JSON, "Host": "evil.example"}, 403),
    ("GET", "/api/vote", None, None, 405),
    ("PUT", "/api/vote", GOOD, None, 405),
    ("POST", "/api/next?annotator=eve", GOOD, None, 405),
    ("DELETE", "/", None, None, 405),
    ("GET", "/api/next", None, None, 400),
    ("GET", "/api/next?annotator=", None, None, 400),
    ("GET", "/api/next?annotator=a&annotator=b", None, None, 400),
    ("GET", "/nope", None, None, 404),
    ("POST", "/nope", GOOD, None, 404),
    ("GET", "/images/../labels.csv", None, None, 404),
    ("GET", "/images/%2e%2e/classes.json", None, None, 404),
    ("GET", "/images/../../../../etc/passwd", None, None, 404),
    ("GET", "/images/votes.sqlite", None, None, 404),
    ("GET", "/images/scenario_000/sample_07.png", None, None, 404),
    ("GET", "/images/scenario_000/./sample_00.png", None, None, 404),
]


def test_malformed_requests_are_refused_and_record_nothing(server, run_dir):
    for method, path, body, headers, expected in BAD_REQUESTS:
        status, answer, response_headers = request(server, method, path, body, headers)
        assert status == expected, (method, path, body, answer)
        assert isinstance(answer, dict) and answer["error"], (method, path)
        if status == 405:
            assert response_headers["Allow"] in ("GET", "POST")
    assert rows(run_dir) == {}
    assert vote(server, **GOOD)[0] == 201  # the server still works
    assert rows(run_dir) == {("eve", 0, 0): 1}


def test_concurrent_annotators_lose_no_vote(server, run_dir):
    annotators = [f"annotator-{i:02d}" for i in range(16)]
    jobs = [(a, k, q, (i + k + q) % len(CLASSES) - (q == 1 and i % 3 == 0))
            for i, a in enumerate(annotators) for k in range(K) for q in range(Q)]
    gate = threading.Event()

    def post(job):
        gate.wait(timeout=10)  # queue up 16 threads, then release them at once
        return vote(server, *job)[0]

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(post, job) for job in jobs]
        gate.set()
        statuses = [future.result() for future in futures]
    assert statuses == [201] * len(jobs)
    assert rows(run_dir) == {(a, k, q): label for a, k, q, label in jobs}
    summary = request(server, "GET", "/api/summary")[1]
    assert summary["votes"] == len(jobs) == 96
    assert summary["annotators"] == {a: 6 for a in annotators}

    # the same annotator re-voting from several threads at once keeps exactly one row
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda label: vote(server, "annotator-00", 1, 1, label)[0],
                                 [0, 1, 2, 3] * 4))
    assert statuses == [200] * 16
    assert len(rows(run_dir)) == 96
    assert rows(run_dir)[("annotator-00", 1, 1)] in (0, 1, 2, 3)


def test_a_restarted_server_keeps_every_vote(run_dir):
    with serve(run_dir) as first:
        for k, q, label in [(0, 0, 1), (0, 1, 2), (1, 0, NONE_OF_THE_ABOVE)]:
            assert vote(first, "frank", k, q, label)[0] == 201
        port = first.port
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/")
    with serve(run_dir) as second:
        item = request(second, "GET", "/api/next?annotator=frank")[1]
        assert (item["scenario"], item["sample"]) == (1, 1)
        assert item["progress"] == {"voted": 3, "total": 6}
        assert request(second, "GET", "/api/summary")[1]["votes"] == 3
    assert rows(run_dir) == {("frank", 0, 0): 1, ("frank", 0, 1): 2, ("frank", 1, 0): -1}


def test_run_annotation_server_blocks_prints_the_url_and_stops_on_ctrl_c(run_dir):
    code = ("import sys; from jfail.defuse.annotation_server import run_annotation_server; "
            "run_annotation_server(sys.argv[1], port=0)")
    process = subprocess.Popen([sys.executable, "-c", code, str(run_dir)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        first = process.stdout.readline()
        assert "3 scenarios x 2 samples, 4 classes, 0 vote(s)" in first
        url = process.stdout.readline().split()[1]
        assert url.startswith("http://127.0.0.1:")
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("POST", "/api/vote", json.dumps(GOOD), JSON)
        assert connection.getresponse().status == 201
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "Stopped; 1 vote(s)" in out
    assert rows(run_dir) == {("eve", 0, 0): 1}


# ---------------------------------------------------------------- reading the votes back

# votes[(k, q)] = labels of annotators a0, a1, ... (sorted by name, as load_votes orders them)
PLANTED = {
    (0, 0): [1, 1, 1, 0, 2],  # 3 of 5 -> 1, agreement 0.6
    (0, 1): [1, 1, 1, 1, 1],  # -> 1, agreement 1
    (1, 0): [1, 1, 2],        # 2 of 3 -> 1, agreement 2/3
    (1, 1): [2, 3],           # tie -> none, agreement 1/2
    (2, 0): [-1, -1, -1, 2],  # 3 of 4 -> none, agreement 3/4
    (2, 1): [-1, -1, 3, 3],   # tie -> none, agreement 1/2
}


def plant(server, votes=PLANTED):
    for (k, q), labels in votes.items():
        for i, label in enumerate(labels):
            assert vote(server, f"a{i}", k, q, label)[0] == 201


def test_majority_labels_and_agreement_on_planted_votes(server, run_dir, tmp_path):
    plant(server)
    votes = load_votes(run_dir)
    for (k, q), labels in PLANTED.items():
        assert votes[k][q].tolist() == labels
    reviews = annotation_reviews(run_dir)
    assert [r.sample_labels.tolist() for r in reviews] == [[1, 1], [1, -1], [-1, -1]]
    assert [r.predictions.tolist() for r in reviews] == PREDICTIONS.tolist()
    assert [r.label for r in reviews] == [1, 1, NONE_OF_THE_ABOVE]
    assert [r.disagreement for r in reviews] == [1.0, 0.5, 1.0]
    # scenario 1 disagrees on exactly rho = 0.5 of its samples; scenario 2 has no label
    assert [r.is_failure for r in reviews] == [True, False, False]
    assert np.allclose([r.agreement for r in reviews], [0.8, (2 / 3 + 0.5) / 2, 0.625])
    # the same semantics as majority_label / annotator_agreement on a fixed number of voters
    five = np.array([PLANTED[0, 0], PLANTED[0, 1]])
    assert reviews[0].sample_labels.tolist() == majority_label(five).tolist()
    assert reviews[0].agreement == pytest.approx(annotator_agreement(five))

    # given predictions replace those of labels.csv; rho is passed on
    agreeing = annotation_reviews(run_dir, predictions=[[1, 1], [1, 0], [0, 0]], rho=0.4)
    assert [r.is_failure for r in agreeing] == [False, True, False]
    with pytest.raises(ValueError, match=r"\[K, Q\] = \(3, 2\)"):
        annotation_reviews(run_dir, predictions=np.zeros((2, 2), int))

    for source in (reviews, run_dir):
        figure = agreement_figure(source, tmp_path / "figures" / "agreement.png")
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 5000


def test_missing_votes_are_named_or_left_out(server, run_dir):
    with pytest.raises(ValueError, match="6 of 6 samples have no votes"):
        annotation_reviews(run_dir)
    plant(server, {(0, 0): [2, 2, 1], (0, 1): [0], (1, 1): [3, 3]})
    with pytest.raises(ValueError, match=r"3 of 6 samples have no votes yet, e\.g\. "
                                         r"\(scenario 1, sample 0\)"):
        annotation_reviews(run_dir)
    reviews = annotation_reviews(run_dir, allow_missing=True)
    assert [r.sample_labels.tolist() for r in reviews] == [[2, 0], [3], []]
    assert [r.predictions.tolist() for r in reviews] == [[0, 0], [1], []]
    assert [r.label for r in reviews] == [0, 3, NONE_OF_THE_ABOVE]
    assert [r.is_failure for r in reviews] == [False, True, False]
    assert reviews[0].agreement == pytest.approx((2 / 3 + 1) / 2)
    assert reviews[1].agreement == 1.0
    assert math.isnan(reviews[2].agreement) and math.isnan(reviews[2].disagreement)


# ---------------------------------------------------------------- the page in Chromium


def test_the_page_records_clicks_and_keys_in_chromium(server, run_dir):
    with chromium() as browser:
        page = browser.new_page()
        problems = []
        page.on("console", lambda m: m.type in ("error", "warning") and problems.append(m.text))
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("requestfailed", lambda r: problems.append(f"failed {r.url}"))
        page.goto(server.url)
        page.fill("#annotator", "carol")
        page.click("#start")
        page.wait_for_selector("body[data-state=ready]")
        image = page.locator("#sample")
        assert (image.get_attribute("data-scenario"), image.get_attribute("data-sample")) == \
            ("0", "0")
        assert page.evaluate("() => document.getElementById('sample').naturalWidth") == 28
        assert page.locator("#buttons button").all_inner_texts() == list(CLASSES)
        assert "carol" in page.url

        page.click("#buttons button[data-label='2']")
        page.wait_for_function(
            "() => document.body.dataset.state === 'ready' && "
            "document.getElementById('sample').dataset.sample === '1'")
        assert page.inner_text("#progress") == "carol: 1 / 6 labelled"
        assert rows(run_dir) == {("carol", 0, 0): 2}

        page.click("text=None of the above")
        page.wait_for_function(
            "() => document.body.dataset.state === 'ready' && "
            "document.getElementById('sample').dataset.scenario === '1'")
        assert rows(run_dir) == {("carol", 0, 0): 2, ("carol", 0, 1): -1}

        # a second annotator in another page, named by the query parameter, starts at the start
        other = browser.new_page()
        other.on("pageerror", lambda error: problems.append(str(error)))
        other.goto(server.url + "?annotator=dave")
        other.wait_for_selector("body[data-state=ready]")
        assert other.locator("#sample").get_attribute("data-scenario") == "0"
        other.keyboard.press("3")
        other.wait_for_function("() => document.getElementById('sample').dataset.sample === '1'")
        assert rows(run_dir)[("dave", 0, 0)] == 3

        for _ in range(4):  # carol labels the rest and is done
            page.wait_for_selector("body[data-state=ready]")
            page.click("#buttons button[data-label='1']")
        page.wait_for_selector("body[data-state=done]")
        assert page.is_visible("#done") and not page.is_visible("#task")
        assert sum(a == "carol" for a, _, _ in rows(run_dir)) == 6
        assert problems == []


# ---------------------------------------------------------------- hostile input and faults

PAGE = (Path(__file__).parents[1] / "jfail" / "defuse" / "annotation_page.html").read_bytes()


def test_hostile_requests_get_a_4xx_and_the_server_keeps_answering(run_dir, caplog, capfd):
    caplog.set_level(logging.WARNING)
    with serve(run_dir, timeout=1.0) as server:
        cases = hostile(server.port)
        for name, data, expected in cases:
            status, headers, body, _ = exchange(server.port, data)
            assert status == expected, (name, status, body[:200])
            if name.startswith("HEAD"):
                assert body == b"", name  # no body, but the length GET would send
                if name == "HEAD /":
                    assert int(headers["content-length"]) == len(PAGE)
                    assert headers["content-type"].startswith("text/html")
            elif status == 400 and headers.get("content-type") != "application/json":
                # HTTP that h11 cannot parse: uvicorn's plain 400, then the connection closes
                assert headers["connection"] == "close" and body, name
            else:
                assert headers["content-type"] == "application/json", name
                assert "error" in json.loads(body) or status == 200, name
            # the server still answers an ordinary request after each
            assert request(server, "GET", "/api/summary")[0] == 200, name
        # truncated requests: the server waits for the rest, then closes without a word
        for name, data in truncated(server.port):
            status, _, body, seconds = exchange(server.port, data, half_close=True)
            assert (status, body) == (None, b"") and seconds < 4, name
        assert request(server, "GET", "/api/summary")[1]["votes"] == 0
        status, page, headers = request(server, "GET", "/")
        assert status == 200 and page == PAGE
        assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert rows(run_dir) == {}
    assert [r.getMessage() for r in caplog.records] == []  # nothing in the log
    assert capfd.readouterr().err == ""


def test_stalled_connections_are_dropped_within_the_timeout(run_dir, caplog, capfd):
    caplog.set_level(logging.WARNING)
    timeout = 1.0
    with serve(run_dir, timeout=timeout) as server:
        port = server.port
        stalls = (
            [b""] * 20  # connect and say nothing
            + [b"GET /api/summary HTTP/1.1\r\nHost: 127.0.0.1\r\n"] * 20  # half a head
            + [raw_request(port, "POST", "/api/vote", headers=[  # a tenth of a body
                "Content-Type: application/json", "Content-Length: 100"], body=b'{"annot')] * 20
        )
        opened = time.monotonic()
        sockets = []
        for data in stalls:
            connection = socket.create_connection(("127.0.0.1", port), timeout=timeout + 4)
            connection.sendall(data)
            sockets.append(connection)
        # a slow drip of a request head does not keep a connection open either
        drip = socket.create_connection(("127.0.0.1", port), timeout=timeout + 4)
        # the server answers others meanwhile
        assert request(server, "GET", "/api/summary")[0] == 200
        dripped = b""
        for byte in b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40:
            try:
                drip.sendall(bytes([byte]))
            except OSError:  # closed by the server: the drip stops
                break
            dripped += bytes([byte])
            time.sleep(0.1)
            if time.monotonic() - opened > timeout + 3:
                break
        closed_after = []
        for n, connection in enumerate(sockets + [drip]):
            answer = b""
            with connection:
                try:
                    while chunk := connection.recv(4096):
                        answer += chunk
                except ConnectionResetError:
                    pass
            closed_after.append(time.monotonic() - opened)
            if 40 <= n < 60:  # a vote whose body stopped coming is told why
                assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
            else:  # a connection without a complete request head is just closed
                assert answer == b"", answer[:100]
        assert max(closed_after) < timeout + 3, max(closed_after)
        assert len(dripped) < 40  # cut off mid-drip, long before the head was complete
        deadline = time.monotonic() + 5
        while server._server.server_state.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server._server.server_state.connections  # no connection held
        assert request(server, "GET", "/api/summary")[1]["votes"] == 0
    assert [r.getMessage() for r in caplog.records] == []
    assert capfd.readouterr().err == ""


def test_past_the_connection_limit_requests_get_503_until_stalled_clients_are_dropped(
        run_dir, monkeypatch, caplog, capfd):
    from jfail.defuse import annotation_server

    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(annotation_server, "_MAX_CONNECTIONS", 8)
    with serve(run_dir, timeout=1.0) as server:
        opened = time.monotonic()
        stalled = [socket.create_connection(("127.0.0.1", server.port), timeout=5)
                   for _ in range(10)]
        deadline = time.monotonic() + 3
        while len(server._server.server_state.connections) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert request(server, "GET", "/api/summary")[0] == 503  # refused at once, no hang
        for connection in stalled:
            with connection:
                assert connection.recv(100) == b""  # dropped by the server
        assert time.monotonic() - opened < 4
        assert request(server, "GET", "/api/summary")[0] == 200
    assert [r.getMessage() for r in caplog.records] == []
    assert capfd.readouterr().err == ""


@pytest.fixture
def wide_run(tmp_path):
    """A run of 10 scenarios x 2 samples, 4 classes: 20 images to vote on."""
    samples = np.random.default_rng(1).uniform(size=(10, 2, 8, 8, 1)).astype(np.float32)
    prepare_annotation(tmp_path, samples, np.zeros((10, 2), int), CLASSES)
    return tmp_path


def test_concurrent_annotators_across_a_restart_lose_and_duplicate_nothing(wide_run):
    jobs = voting_jobs()  # 8 annotators x 20 votes
    current = {}
    acknowledged = []
    restarted = threading.Event()
    deadline = time.monotonic() + 60

    def annotate(i):
        mine = [job for job in jobs if job[0] == f"annotator-{i}"]
        results = []
        for n, job in enumerate(mine):
            if n == 15:  # the last 5 votes of everyone go to the restarted server
                assert restarted.wait(timeout=30)
            results.append((job, *vote_until_acknowledged(lambda _: current["port"], job,
                                                          deadline)))
            acknowledged.append(job)
        return results

    first = serve(wide_run, timeout=2.0)
    current["port"] = first.port
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(annotate, i) for i in range(8)]
        while len(acknowledged) < 40 and time.monotonic() < deadline:
            time.sleep(0.005)
        first.shutdown()  # mid-round: requests in progress finish, the rest are refused
        stopped_at = len(acknowledged)
        with serve(wide_run, port=first.port, timeout=2.0) as second:
            restarted.set()
            results = [item for future in futures for item in future.result()]
            summary = request(second, "GET", "/api/summary")[1]
    assert 40 <= stopped_at <= 120  # the restart fell in the middle of the round
    assert sorted(job for job, _, _ in results) == sorted(jobs)
    # a vote acknowledged at the first attempt was new; a retried one may find itself stored
    assert all(status == 201 for _, status, attempts in results if attempts == 1)
    assert all(status in (200, 201) for _, status, _ in results)
    assert rows(wide_run) == {(a, k, q): label for a, k, q, label in jobs}
    assert summary["votes"] == len(jobs) == 160
    assert summary["annotators"] == {f"annotator-{i}": 20 for i in range(8)}


def test_two_servers_on_one_database_store_every_vote_once(wide_run, tmp_path_factory):
    other = ServerProcess(wide_run, tmp_path_factory.mktemp("other") / "stderr.txt").start()
    try:
        there = other.port
        with serve(wide_run) as here:
            jobs = voting_jobs()
            ports = {job: (here.port, there)[n % 2] for n, job in enumerate(jobs)}
            deadline = time.monotonic() + 60
            gate = threading.Event()

            def post(job):
                gate.wait(timeout=10)
                return vote_until_acknowledged(ports.get, job, deadline)

            with ThreadPoolExecutor(16) as pool:
                futures = [pool.submit(post, job) for job in jobs]
                gate.set()
                results = [future.result() for future in futures]
            assert results == [(201, 1)] * len(jobs)  # each acknowledged once, as new
            # the same vote re-cast through both servers at once stays one row
            revotes = [(("annotator-0", 4, 1, label), port)
                       for label in (0, 1, 2, 3) for port in (here.port, there)] * 2
            with ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(
                    lambda item: vote_until_acknowledged(lambda _: item[1], item[0], deadline),
                    revotes))
            assert statuses == [(200, 1)] * len(revotes)
            summaries = [request(here, "GET", "/api/summary")[1],
                         http_probe.request(there, "GET", "/api/summary")[1]]
        status = other.stop(timeout=15)
    finally:
        other.kill()
    assert status == 0, other.stderr
    assert "Stopped; 160 vote(s)" in other.stdout and other.stderr == ""
    assert summaries[0] == summaries[1] and summaries[0]["votes"] == 160
    stored = rows(wide_run)
    assert len(stored) == 160 and stored[("annotator-0", 4, 1)] in (0, 1, 2, 3)
    assert {key: label for key, label in stored.items() if key != ("annotator-0", 4, 1)} == {
        (a, k, q): label for a, k, q, label in jobs if (a, k, q) != ("annotator-0", 4, 1)}


def test_a_database_fault_is_one_logged_500_and_the_server_recovers(server, run_dir, caplog):
    database = run_dir / "annotation" / VOTES_FILE
    with sqlite3.connect(database) as connection:
        connection.execute("ALTER TABLE votes RENAME TO elsewhere")
    with caplog.at_level(logging.WARNING):
        status, answer, headers = vote(server, **GOOD)
    assert (status, answer) == (500, {"error": "internal error"})
    assert headers["Content-Type"] == "application/json"
    assert [(r.name, r.levelname) for r in caplog.records] == [
        ("jfail.defuse.annotation_server", "ERROR")]
    assert "no such table: votes" in caplog.text
    with sqlite3.connect(database) as connection:
        connection.execute("ALTER TABLE elsewhere RENAME TO votes")
    assert vote(server, **GOOD)[0] == 201
    assert rows(run_dir) == {("eve", 0, 0): 1}


def test_annotator_names_are_normalized(server, run_dir):
    spellings = [" Mal  Reynolds ", "MAL REYNOLDS", "mal\treynolds", "ｍａｌ\u00a0reynolds"]
    assert vote(server, spellings[0], 0, 0, 1)[0] == 201
    for label, name in enumerate(spellings[1:], start=2):
        status, answer, _ = vote(server, name, 0, 0, label % 4)
        assert status == 200 and answer["replaced"] is True, name
    assert rows(run_dir) == {("mal reynolds", 0, 0): 0}
    query = urllib.parse.urlencode({"annotator": "  Mal Reynolds"})
    item = request(server, "GET", f"/api/next?{query}")[1]
    assert item["progress"]["voted"] == 1 and (item["scenario"], item["sample"]) == (0, 1)
    assert request(server, "GET", "/api/summary")[1]["annotators"] == {"mal reynolds": 1}
    # brackets and quotes inside a name are not nesting
    tricky = 'O\'Neil "[{[{" \\ }]'
    assert vote(server, tricky, 0, 0, 2)[0] == 201
    assert ('o\'neil "[{[{" \\ }]', 0, 0) in rows(run_dir)
    for bad in ("x" * 101, "bob\x00", "\u200b\u2028", "   "):
        assert vote(server, bad, 0, 1, 1)[0] == 400, repr(bad)
        assert request(server, "GET", "/api/next?" + urllib.parse.urlencode(
            {"annotator": bad}))[0] == 400, repr(bad)
    assert len(rows(run_dir)) == 2


def test_votes_under_old_spellings_are_merged_when_a_server_starts(run_dir):
    with sqlite3.connect(run_dir / "annotation" / VOTES_FILE) as connection:
        connection.executemany("INSERT INTO votes VALUES (?, ?, ?, ?, ?)", [
            ("Alice", 0, 0, 1, 100.0), ("ALICE", 0, 0, 2, 200.0), ("Alice", 0, 1, 3, 50.0),
            ("bob", 1, 0, 0, 10.0), ("Bob", 1, 0, 3, 5.0)])
    with serve(run_dir) as server:
        assert rows(run_dir) == {("alice", 0, 0): 2, ("alice", 0, 1): 3, ("bob", 1, 0): 0}
        assert vote(server, "alice", 0, 1, 0)[0] == 200


def test_cli_port_errors_are_one_line_and_an_exit_status(run_dir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).parents[1])}
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    with busy:
        cases = [("70000", 2, "--port must be an integer in 0..65535 (0 picks a free port), "
                              "got '70000'"),
                 ("http", 2, "--port must be an integer in 0..65535"),
                 (str(busy.getsockname()[1]), 1, "is already in use")]
        processes = [subprocess.Popen(
            [sys.executable, "-m", "jfail.cli", "annotate", str(run_dir), f"--port={port}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for port, _, _ in cases + [("0", 0, "")]]
        free = processes.pop()  # --port 0 still picks a free port
        try:
            outputs = [process.communicate(timeout=60) for process in processes]
            free.stdout.readline()
            url = free.stdout.readline().split()[1]
            assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/")
            port = int(url.rstrip("/").rsplit(":", 1)[1])
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", "/api/summary")
            assert connection.getresponse().status == 200
            connection.close()
            free.send_signal(signal.SIGINT)
            _, free_err = free.communicate(timeout=30)
        finally:
            for process in processes + [free]:
                if process.poll() is None:
                    process.kill()
    assert free.returncode == 0 and free_err == ""
    for (port, code, message), process, (out, err) in zip(cases, processes, outputs):
        assert process.returncode == code, (port, err)
        assert len(err.splitlines()) == 1 and err.startswith("jfail annotate: "), (port, err)
        assert message in err and out == "", (port, err)
