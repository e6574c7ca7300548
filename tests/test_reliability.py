"""The reliability report's annotation-server and full-disk sections: every sentence is written
from the numbers, and a small real run of the server probe (3 annotators x 4 images, 1 kill)."""

import json

import pytest

from jfail.pipelines.reliability import markdown, run_server


def hostile_row(name, expected, status, answered=True):
    return {"name": name, "expected": expected, "status": status, "seconds": 0.01, "error": "",
            "then_answered": answered}


SERVER = {
    "annotators": 7, "images": 6, "scenarios": 3, "samples_per_scenario": 2,
    "kills": [{"acknowledged_before": 13, "was_running": True, "restart_seconds": 2.25},
              {"acknowledged_before": 27, "was_running": True, "restart_seconds": 1.5}],
    "votes_sent": 42, "acknowledged": 41, "acknowledged_new": 38, "acknowledged_replaced": 3,
    "retried": 9, "attempts": 517,
    "not_acknowledged": [{"vote": ["annotator-6", 2, 1, 1], "status": 500,
                          "error": "('annotator-6', 2, 1, 1) got HTTP 500"}],
    "stored": 40, "lost": [["annotator-2", 0, 1]], "duplicated": 0, "unexpected_rows": [],
    "summary_votes": 40, "voting_seconds": 12.3,
    "hostile": [hostile_row("evil Host", 403, 403), hostile_row("TLS handshake", 400, 400),
                hostile_row("chunked vote", 411, 502, answered=False),
                hostile_row("vote body cut short", None, None)],
    "votes_before_hostile": 40, "votes_after_hostile": 40,
    "servers_started": 3, "final_exit_status": 0, "final_stopped_line": True,
    "stderr_lines": 4, "tracebacks": 1, "stderr_excerpt": "Traceback (most recent call last):",
}
REPORT = {"command": "python experiments/reliability.py --annotators 7", "kills": [],
          "bad_configs": [], "seconds": 99.0, "server": SERVER,
          "full_disk": {"skipped": "", "status": 1, "stderr_lines": 1,
                        "message": "jfail train: no space left on device (/disk/run)",
                        "traceback": False, "rerun_status": 0, "resumed": True}}


def test_the_server_sections_are_written_from_the_numbers():
    text = markdown(REPORT)
    assert "7 annotators voted at once, each on all 6 images (3 scenarios x 2 samples): " \
           "42 votes" in text
    assert "SIGKILL 2 time(s)" in text
    assert "41 of 42 votes were acknowledged (38 as new, 3 as replacing" in text
    assert "9 needed more than one attempt, 517 attempts in all, in 12 s" in text
    assert "held 40 rows: 1 acknowledged vote(s) lost" in text and "0 duplicated" in text
    assert "1 vote(s) were never acknowledged (statuses 500)" in text
    assert "| 2 | 27 | yes | 1.5 |" in text
    assert "4 hostile or truncated requests" in text
    assert "3 of 4 got the expected answer, 1 got a 5xx, and after 3 of 4 the server " \
           "answered" in text
    assert "| chunked vote | 411 | 502 | no |" in text
    assert "| vote body cut short | closed | closed | yes |" in text
    assert "3 server processes were started (none with --debug); together they wrote 4 " \
           "line(s) on stderr, and the stderr of 1 of them held a traceback" in text
    assert "exited 0 and resumed to a trained run" in text and "exit status 1, 1 line(s)" in text
    assert "no traceback" in text and "Traceback (most recent call last)" in text


def test_a_skipped_full_disk_says_why_and_a_report_without_a_server_still_renders():
    report = {**REPORT, "server": None,
              "full_disk": {"skipped": "a 3m tmpfs could not be mounted (permission denied)"}}
    text = markdown(report)
    assert "Skipped: a 3m tmpfs could not be mounted (permission denied)." in text
    assert "Annotation server" not in text


@pytest.mark.slow
def test_a_small_server_run_loses_nothing_across_a_kill(tmp_path):
    server = run_server(tmp_path, annotators=3, images=4, kills=1, deadline=120)
    assert server["votes_sent"] == server["acknowledged"] == server["stored"] == 12
    assert server["lost"] == [] and server["duplicated"] == 0
    assert server["unexpected_rows"] == [] and server["not_acknowledged"] == []
    assert len(server["kills"]) == 1 and server["servers_started"] == 2
    rows = server["hostile"]
    assert len(rows) > 40
    assert [r["name"] for r in rows if r["status"] != r["expected"]] == []
    assert all(r["then_answered"] for r in rows)
    assert server["votes_after_hostile"] == server["votes_before_hostile"] == 12
    assert server["final_exit_status"] == 0 and server["tracebacks"] == 0
    json.dumps(server, allow_nan=False)  # strict JSON
    text = markdown({**REPORT, "server": server})
    assert "12 of 12 votes were acknowledged" in text and "0 acknowledged vote(s) lost" in text
