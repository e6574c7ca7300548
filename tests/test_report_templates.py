"""The results files and report sections are the templates' rendering of structured results.

Each pair `<name>.json` / `<name>.md` below was written by a pipeline: the Markdown must be the
template's rendering of the JSON, byte for byte, and the report section rendered from the JSON
must say what the Markdown says (the same HTML as the Markdown rendered by markdown-it-py).
`tests/data/reports` holds pairs from a small run of the demo (`tests/test_demo.py`'s settings)
and, under `user_model/`, from Barlow and PRIME on one's own model (`tests/test_user_model.py`),
all written before the templates existed; `results/reliability.*` is the committed full run.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from jfail.report import Result, build_report, render_markdown

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "data" / "reports"
PAIRS = [  # (template, JSON path)
    ("reliability", ROOT / "results" / "reliability.json"),
    ("barlow", FIXTURES / "barlow.json"),
    ("defuse", FIXTURES / "defuse.json"),
    ("prime", FIXTURES / "prime.json"),
    ("debug_tests", FIXTURES / "debug_tests.json"),
    ("demo", FIXTURES / "demo.json"),
    ("barlow", FIXTURES / "user_model" / "barlow_fmnist.json"),
    ("prime", FIXTURES / "user_model" / "prime_fmnist.json"),
]
PAIR_IDS = [str(path.relative_to(ROOT)) for _, path in PAIRS]
# a 1x1 PNG, standing in for the figures the results refer to
PIXEL = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d4944415478da63f8cfc0f01f0005000201a5f1e3e90000000049454e44ae426082")


@pytest.mark.parametrize("template, path", PAIRS, ids=PAIR_IDS)
def test_markdown_is_the_template_of_the_json(template, path):
    result = json.loads(path.read_text(encoding="utf-8"))
    markdown = path.with_suffix(".md").read_text(encoding="utf-8")
    assert render_markdown(template, result, name=path.stem) == markdown


def _sections(page: str) -> dict[str, str]:
    """Each section's HTML, whitespace between tags dropped, by section id."""
    found = re.findall(r'<section class="method" id="([^"]+)">(.*?)</section>', page, re.S)
    return {section_id: re.sub(r"\s+", " ", re.sub(r">\s+<", "><", body)).strip()
            for section_id, body in found}


@pytest.mark.parametrize("template, path", PAIRS, ids=PAIR_IDS)
def test_report_section_of_the_json_is_the_markdown_in_html(template, path, tmp_path):
    shutil.copy(path, tmp_path / path.name)
    shutil.copy(path.with_suffix(".md"), tmp_path / "markdown.md")
    for figure in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", path.with_suffix(".md").read_text()):
        (tmp_path / figure).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / figure).write_bytes(PIXEL)
    page = build_report(tmp_path, [("Results", Result(template, path.name)),
                                   ("Markdown", "markdown.md")]).read_text()
    sections = _sections(page)
    from_json, from_markdown = sections["results"], sections["markdown"]
    from_markdown = (from_markdown.replace('id="markdown-', 'id="results-')
                     .replace('href="#markdown-', 'href="#results-')
                     .replace(">Markdown<", ">Results<").replace(">markdown.md<", f">{path.name}<"))
    assert from_json == from_markdown
    assert from_json.count("<table") == path.with_suffix(".md").read_text().count("\n| ---")


def test_rendering_from_a_result_missing_a_field_names_it():
    result = json.loads((ROOT / "results" / "reliability.json").read_text())
    del result["bad_configs"]
    with pytest.raises(ValueError, match="reliability.*bad_configs"):
        render_markdown("reliability", result, name="reliability")
    with pytest.raises(ValueError, match="no report template 'barlw'; known: barlow, "):
        render_markdown("barlw", result, name="barlow")
