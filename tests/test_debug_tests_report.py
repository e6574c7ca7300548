"""The debugging tests' report is a function of their JSON result alone."""

from __future__ import annotations

import json
from pathlib import Path

from jfail.pipelines.debug_tests import render_markdown

RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_the_committed_appendix_g_report_is_rendered_from_its_json():
    result = json.loads((RESULTS / "debug_tests_appendix_g.json").read_text())
    assert render_markdown(result) == (RESULTS / "debug_tests_appendix_g.md").read_text()
