"""Probing the annotation server over HTTP: hostile raw requests, acknowledged votes and a
server in its own process that can be SIGKILLed.

    status, headers, body, seconds = exchange(port, raw_request(port, "GET", "/api/summary"))
    for name, data, expected in hostile(port): ...     # ~50 requests and the status each must get
    status, attempts = vote_until_acknowledged(lambda job: port, job, deadline)
    with ServerProcess(run_dir) as server: ...         # `jfail annotate` in a subprocess

Used by the annotation server's tests and by the reliability experiment
(`jfail.pipelines.reliability`), so that both send the same bytes and expect the same answers.
A vote here is a job `(annotator, scenario, sample, label)`.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "GOOD",
    "JSON",
    "CLOSE",
    "UnexpectedStatus",
    "ServerProcess",
    "request",
    "exchange",
    "raw_request",
    "vote_bytes",
    "hostile",
    "truncated",
    "voting_jobs",
    "vote_until_acknowledged",
]

GOOD = {"annotator": "eve", "scenario": 0, "sample": 0, "label": 1}
"""A valid vote on any prepared run with at least two classes."""
JSON = {"Content-Type": "application/json"}
CLOSE = "Connection: close"


class UnexpectedStatus(RuntimeError):
    """A vote got an answer other than 200, 201 or 503 (`.status`)."""

    def __init__(self, job, status: int):
        super().__init__(f"{job} got HTTP {status}")
        self.job = job
        self.status = status


def request(port: int, method: str, path: str, body=None, headers=None, *, timeout=10.0):
    """(status, parsed JSON or raw bytes, response headers) of one request on a fresh connection;
    a dict or list `body` is sent as JSON.

    Args:
      port: the server's port on 127.0.0.1.
      method: the HTTP method.
      path: the request target.
      body: None, bytes or str, or a dict or list sent as JSON.
      headers: extra request headers.
      timeout: the socket timeout in seconds.

    Returns:
      `(status, data, headers)`: `data` parsed when the response is JSON, else its bytes.

    Raises:
      OSError: the connection failed or timed out.
      http.client.HTTPException: the response was not valid HTTP.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers = {**JSON, **(headers or {})}
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        if response.getheader("Content-Type", "").startswith("application/json"):
            data = json.loads(data)
        return response.status, data, dict(response.getheaders())
    finally:
        connection.close()


def exchange(port: int, data: bytes, *, half_close: bool = False, wait: float = 5.0):
    """(status or None, headers, body, seconds) of raw bytes sent on a fresh connection.

    Reads one response (or up to the server closing the connection); status None means the
    server closed the connection without answering. `half_close` shuts the sending side after
    `data`; `wait` is the socket timeout in seconds.

    Args:
      port: the server's port on 127.0.0.1.
      data: the raw request bytes.
      half_close: shut the sending side after `data`.
      wait: the socket timeout in seconds.

    Returns:
      `(status, headers, body, seconds)`: header names lower-cased.

    Raises:
      OSError: the connection failed or a read timed out.
    """
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as connection:
        connection.sendall(data)
        if half_close:
            connection.shutdown(socket.SHUT_WR)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = connection.recv(65536)
            if not chunk:
                return None, {}, received, time.monotonic() - started
            received += chunk
        head, body = received.split(b"\r\n\r\n", 1)
        status = int(head.split()[1])
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        expected = 0 if data.startswith(b"HEAD ") else int(headers.get("content-length", 0))
        if "content-length" in headers:
            while len(body) < expected:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                body += chunk
        else:  # uvicorn's own 400: the body runs to the end of the connection
            while chunk := connection.recv(65536):
                body += chunk
        if headers.get("connection") == "close" or data.startswith(b"HEAD "):
            while chunk := connection.recv(65536):  # nothing may follow (HEAD has no body)
                body += chunk
    return status, headers, body, time.monotonic() - started


def raw_request(port: int, method: str, target: str, *, host=None, headers=(),
                body: bytes = b"") -> bytes:
    """The bytes of an HTTP/1.1 request; `host` None is this server's, "" leaves Host out.

    Args:
      port: the server's port (for the default Host).
      method: the HTTP method.
      target: the request target.
      host: the Host header's value; None for `127.0.0.1:port`, "" for none.
      headers: further header lines, without line ends.
      body: the body bytes (no Content-Length is added).

    Returns:
      The request bytes.
    """
    host = f"127.0.0.1:{port}" if host is None else host
    lines = [f"{method} {target} HTTP/1.1"] + ([f"Host: {host}"] if host else []) + list(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def vote_bytes(port: int, body: bytes, *extra: str) -> bytes:
    """A POST /api/vote of `body` as JSON with its Content-Length and `extra` header lines.

    Args:
      port: the server's port.
      body: the body bytes.
      *extra: further header lines.

    Returns:
      The request bytes.
    """
    return raw_request(port, "POST", "/api/vote", body=body, headers=[
        "Content-Type: application/json", f"Content-Length: {len(body)}", *extra])


def hostile(port: int) -> list[tuple[str, bytes, int]]:
    """(name, bytes, expected status) of hostile requests: each must get that status (a 4xx, or
    200 where the documentation allows it) and record no vote.

    Args:
      port: the server's port.

    Returns:
      list of `(name, request bytes, expected status)`.
    """
    good = json.dumps(GOOD).encode()
    return [
        ("two Host headers", raw_request(port, "GET", "/api/summary",
                                         headers=["Host: evil.example"]), 400),
        ("two Host headers, both loopback", raw_request(
            port, "GET", "/api/summary", headers=[f"Host: localhost:{port}"]), 400),
        ("evil Host", raw_request(port, "GET", "/api/summary", host="evil.example"), 403),
        ("evil Host, our port", raw_request(port, "GET", "/", host=f"evil.example:{port}"), 403),
        ("loopback Host, other port", raw_request(port, "GET", "/", host="127.0.0.1:1"), 403),
        ("Host with a suffix", raw_request(port, "GET", "/", host=f"127.0.0.1:{port}.evil"),
         403),
        ("no Host (HTTP/1.0)", b"GET /api/summary HTTP/1.0\r\n\r\n", 400),
        ("absolute URI, evil host", raw_request(port, "GET", "http://evil.example/api/summary"),
         400),
        ("absolute URI, userinfo", raw_request(
            port, "GET", f"http://127.0.0.1:{port}@evil.example/api/summary"), 400),
        ("absolute URI, https", raw_request(port, "GET", f"https://127.0.0.1:{port}/"), 400),
        ("asterisk target", raw_request(port, "OPTIONS", "*"), 400),
        ("absolute URI, this server", raw_request(
            port, "GET", f"http://localhost:{port}/api/summary"), 200),
        ("vote nested 10k deep", vote_bytes(port, b"[" * 10_000 + b"]" * 6_000), 400),
        ("vote nested 8k deep, well formed", vote_bytes(port, b"[" * 8_000 + b"]" * 8_000), 400),
        ("vote nested 10k deep, 20 kB", vote_bytes(port, b"[" * 10_000 + b"]" * 10_000), 413),
        ("vote object nested 2.5k deep", vote_bytes(
            port, b'{"a":' * 2_500 + b"1" + b"}" * 2_500), 400),
        ("vote with a nested field", vote_bytes(
            port, json.dumps({**GOOD, "annotator": {"name": "eve"}}).encode()), 400),
        ("vote unclosed", vote_bytes(port, b"[" * 16_000), 400),
        ("vote huge integer", vote_bytes(port, b'{"annotator": "e", "scenario": 0, "sample": 0, '
                                               b'"label": ' + b"9" * 5000 + b"}"), 400),
        ("vote NaN label", vote_bytes(port, b'{"annotator": "e", "scenario": 0, "sample": 0, '
                                            b'"label": NaN}'), 400),
        ("vote declares 100 kB", raw_request(port, "POST", "/api/vote", headers=[
            "Content-Type: application/json", "Content-Length: 100000"], body=good), 413),
        ("negative Content-Length", raw_request(port, "POST", "/api/vote", headers=[
            "Content-Type: application/json", "Content-Length: -5"], body=good), 400),
        ("non-numeric Content-Length", raw_request(port, "POST", "/api/vote", headers=[
            "Content-Type: application/json", "Content-Length: 1e3"], body=good), 400),
        ("5000-digit Content-Length", raw_request(port, "POST", "/api/vote", headers=[
            "Content-Type: application/json", "Content-Length: " + "9" * 5000], body=good), 400),
        ("two Content-Lengths", raw_request(port, "POST", "/api/vote", headers=[
            "Content-Type: application/json", f"Content-Length: {len(good)}",
            "Content-Length: 3"], body=good), 400),
        ("chunked vote", raw_request(port, "POST", "/api/vote", headers=[
            "Content-Type: application/json", "Transfer-Encoding: chunked"],
            body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(good), good)), 411),
        ("chunked vote with a Content-Length too", raw_request(port, "POST", "/api/vote", headers=[
            "Content-Type: application/json", "Content-Length: 10", "Transfer-Encoding: chunked"],
            body=b"%x\r\n%s\r\n0\r\n\r\n" % (30_000, b"x" * 30_000)), 411),
        ("vote as a form", raw_request(port, "POST", "/api/vote", headers=[
            "Content-Type: application/x-www-form-urlencoded", f"Content-Length: {len(good)}"],
            body=good), 415),
        ("made-up method", raw_request(port, "BREW", "/"), 405),
        ("DELETE a vote", raw_request(port, "DELETE", "/api/vote"), 405),
        ("HEAD the vote", raw_request(port, "HEAD", "/api/vote", headers=[CLOSE]), 405),
        ("HEAD /", raw_request(port, "HEAD", "/", headers=[CLOSE]), 200),
        ("HEAD the summary", raw_request(port, "HEAD", "/api/summary", headers=[CLOSE]),
         200),
        ("trailing slash", raw_request(port, "GET", "/api/summary/"), 404),
        ("traversal", raw_request(port, "GET", "/images/../labels.csv"), 404),
        ("traversal, encoded", raw_request(port, "GET", "/images/%2e%2e/classes.json"), 404),
        ("traversal, encoded slash", raw_request(port, "GET", "/images/..%2fvotes.sqlite"), 404),
        ("traversal, double encoded", raw_request(port, "GET", "/images/%252e%252e/labels.csv"),
         404),
        ("traversal, backslashes", raw_request(port, "GET", "/images/..%5c..%5clabels.csv"), 404),
        ("traversal, absolute", raw_request(port, "GET", "/images//etc/passwd"), 404),
        ("traversal above the root", raw_request(port, "GET", "/../../etc/passwd"), 404),
        ("NUL in an image path", raw_request(
            port, "GET", "/images/scenario_000/sample_00.png%00"), 404),
        # h11 buffers at most 16 KiB of an unfinished request head
        ("request head past 16 KiB", raw_request(
            port, "GET", "/", headers=["X-Pad: " + "a" * 20_000])[:-4], 400),
        ("URL past 16 KiB", b"GET /" + b"a" * 20_000, 400),
        ("TLS handshake", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(64), 400),
        ("bare newline junk", b"\r\n\r\n\r\n", 400),
    ]


def truncated(port: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of requests cut short; sent with `half_close=True` the server must close
    the connection without an answer.

    Args:
      port: the server's port.

    Returns:
      list of `(name, request bytes)`.
    """
    return [
        ("request line cut short", b"GET /api/sum"),
        ("request head cut short", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
        ("vote body cut short", vote_bytes(port, json.dumps(GOOD).encode())[:-10]),
    ]


def voting_jobs(annotators: int = 8, k: int = 10, q: int = 2, num_classes: int = 4) -> list:
    """One vote `(annotator, scenario, sample, label)` of each of `annotators` on each of `k x q`
    images, labels spread over the classes and "none of the above" (-1).

    Args:
      annotators: the number of annotators.
      k: scenarios.
      q: samples per scenario.
      num_classes: labels are in `[0, num_classes)`, or -1.

    Returns:
      list of `annotators * k * q` jobs.
    """
    return [(f"annotator-{i}", s, t, (i + s + t) % num_classes - (i == t == 1))
            for i in range(annotators) for s in range(k) for t in range(q)]


def vote_until_acknowledged(port_of: Callable, job, deadline: float, *, pause: float = 0.02):
    """Send one vote until a server acknowledges it (200 or 201): (status, attempts).

    port_of(job) names the port of each attempt (a restarted server may have moved). A refused
    or cut-off connection and 503 (too many connections) are retried until the
    `time.monotonic()` deadline.

    Args:
      port_of: `port_of(job) -> int`, the port of each attempt.
      job: `(annotator, scenario, sample, label)`.
      deadline: the `time.monotonic()` time to give up at.
      pause: seconds between attempts.

    Returns:
      `(status, attempts)`: 200 or 201, and the number of attempts made.

    Raises:
      UnexpectedStatus: another status came back.
      TimeoutError: the deadline passed first.
    """
    annotator, k, q, label = job
    body = json.dumps({"annotator": annotator, "scenario": k, "sample": q, "label": label})
    attempts = 0
    while time.monotonic() < deadline:
        attempts += 1
        connection = http.client.HTTPConnection("127.0.0.1", port_of(job), timeout=10)
        try:
            connection.request("POST", "/api/vote", body, JSON)
            response = connection.getresponse()
            response.read()
            if response.status in (200, 201):
                return response.status, attempts
            if response.status != 503:
                raise UnexpectedStatus(job, response.status)
        except (OSError, http.client.HTTPException):
            pass  # refused or cut off while the server restarts: not acknowledged, retry
        finally:
            connection.close()
        time.sleep(pause)
    raise TimeoutError(f"{job} was never acknowledged")


class ServerProcess:
    """`jfail annotate RUN_DIR --port PORT` in a subprocess, its stderr in a file.

    `start()` returns once the server prints its URL (`.port` is then the bound port; with
    port 0 a free one); `kill()` sends SIGKILL, `stop()` SIGINT and waits for a clean exit.
    `stderr` is the text the process wrote on stderr so far.
    """

    def __init__(self, run_dir, stderr_path, *, port: int = 0, env=None):
        self.run_dir = Path(run_dir)
        self.stderr_path = Path(stderr_path)
        self.port = int(port)
        self.env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
        self.process = None
        self.stdout = ""

    def start(self, timeout: float = 120.0) -> ServerProcess:
        """Start the server and wait until it prints its URL.

        Args:
          timeout: seconds to wait for the URL.

        Returns:
          self, with `.port` the bound port.

        Raises:
          RuntimeError: the server exited before printing its URL.
          TimeoutError: no URL within `timeout` (the process is then killed).
        """
        self.stderr_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.stderr_path, "ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "jfail.cli", "annotate", str(self.run_dir),
                 f"--port={self.port}"],
                stdout=subprocess.PIPE, stderr=err, text=True, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the annotation server exited: {self.stderr[-2000:]}")
            self.stdout += line
            if line.startswith("Open http://"):
                self.port = int(line.split()[1].rstrip("/").rsplit(":", 1)[1])
                return self
        self.kill()
        raise TimeoutError("the annotation server did not print its URL")

    @property
    def stderr(self) -> str:
        """The text the process wrote on stderr so far ("" before it started).

        Returns:
          The stderr file's text.
        """
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no chance to finish requests or close the database.

        Waits for the process to end; does nothing if it was never started.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()
            self.process.stdout.close()

    def stop(self, timeout: float = 30.0) -> int:
        """Ctrl-C and wait; the exit status (the process is killed past `timeout`).

        Args:
          timeout: seconds to wait for a clean exit before SIGKILL.

        Returns:
          The process's exit status.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            out, _ = self.process.communicate(timeout=timeout)
            self.stdout += out or ""
        except subprocess.TimeoutExpired:
            self.kill()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
