"""Tests for jfail.report: the Markdown renderer, the self-contained page, the page in Chromium."""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from jfail.report import build_report, markdown_to_html

sys.path.insert(0, str(Path(__file__).parent))
from browser import chromium  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
RESULT_SECTIONS = (
    ("Barlow", "barlow_fmnist.md"),
    ("Defuse", "defuse_fmnist.md"),
    ("Debugging tests for explanations", "debug_tests.md"),
    ("PRIME", "prime_fmnist.md"),
)


class _ElementCollector(HTMLParser):
    """Every start tag of a page as (tag, attributes), plus the page's text."""

    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> _ElementCollector:
    collector = _ElementCollector()
    collector.feed(page)
    collector.close()
    return collector


def tags(page: str, name: str) -> list[dict[str, str | None]]:
    return [attributes for tag, attributes in parse(page).elements if tag == name]


# ---------------------------------------------------------------- the renderer


def test_table_has_header_cells_body_cells_and_alignment():
    rendered = markdown_to_html(
        "| method | SSIM | rank |\n| --- | ---: | :---: |\n"
        "| gradient | 0.007 ± 0.001 | 3 |\n| lime | 0.043 | 1 |\n")
    assert len(tags(rendered, "table")) == 1
    assert len(tags(rendered, "th")) == 3
    assert len(tags(rendered, "td")) == 6
    assert re.search(r"<th>method</th>", rendered)
    assert '<td class="align-right">0.007 ± 0.001</td>' in rendered
    assert '<td class="align-center">3</td>' in rendered


def test_table_pads_short_rows_and_keeps_escaped_pipes_in_cells():
    rendered = markdown_to_html("| a | \\|I_S\\| |\n| --- | ---: |\n| x |\n")
    assert len(tags(rendered, "td")) == 2
    assert "<th class=\"align-right\">|I_S|</th>" in rendered


def test_html_in_markdown_is_escaped():
    rendered = markdown_to_html("Hello <script>alert(1)</script> & **<b>bold</b>**\n")
    assert "<script" not in rendered
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered
    assert "<strong>&lt;b&gt;bold&lt;/b&gt;</strong>" in rendered
    assert {tag for tag, _ in parse(rendered).elements} == {"p", "strong"}


def test_underscores_inside_words_are_not_italics():
    rendered = markdown_to_html(
        "snake_case_word, max_per_image and A'_S over |I'_S|; but _this_ is italic.\n")
    assert "snake_case_word" in rendered and "max_per_image" in rendered
    assert rendered.count("<em>") == 1
    assert "<em>this</em>" in rendered


def test_bold_italic_and_symbols():
    rendered = markdown_to_html("**The shortcut.** *ε = 1.0*, λ ≥ 0.5 ± σ, 2 * 3 * 4\n")
    assert "<strong>The shortcut.</strong>" in rendered
    assert "<em>ε = 1.0</em>" in rendered
    assert "λ ≥ 0.5 ± σ, 2 * 3 * 4" in rendered


def test_nested_lists_by_indentation():
    rendered = markdown_to_html(
        "1. **First.** text\n   continued\n   - sub one\n     more\n   - sub two\n2. Second\n\n"
        "- a\n  - b\n    - c\n- d\n")
    outer_ordered = re.search(r"<ol>\s*<li>(.*?)</li>\s*<li>Second</li>\s*</ol>", rendered, re.S)
    assert outer_ordered, rendered
    assert "<ul>\n<li>sub one\nmore</li>\n<li>sub two</li>\n</ul>" in outer_ordered.group(1)
    assert "continued" in outer_ordered.group(1)
    assert re.search(r"<ul>\s*<li>a\s*<ul>\s*<li>b\s*<ul>\s*<li>c</li>\s*</ul></li>\s*</ul></li>"
                     r"\s*<li>d</li>\s*</ul>", rendered), rendered


def test_image_inside_a_list_item():
    rendered = markdown_to_html("- Shirt: ![Shirt](modes/shirt.png)\n- Bag: ![Bag](bag.png)\n",
                                image_src={"modes/shirt.png": "data:image/png;base64,AAAA",
                                           "bag.png": "data:image/png;base64,BBBB"}.get)
    items = re.findall(r"<li>(.*?)</li>", rendered)
    assert items == ['Shirt: <img src="data:image/png;base64,AAAA" alt="Shirt">',
                     'Bag: <img src="data:image/png;base64,BBBB" alt="Bag">']


def test_code_block_is_escaped_and_not_formatted():
    rendered = markdown_to_html(
        "```bash\npython run.py --max_per_image 3 **x** <b> [a](b)\n```\n\nafter `a_b_c <i>`\n")
    code = re.search(r'<pre><code class="language-bash">(.*?)</code></pre>', rendered, re.S)
    assert code.group(1) == "python run.py --max_per_image 3 **x** &lt;b&gt; [a](b)"
    assert "<code>a_b_c &lt;i&gt;</code>" in rendered
    assert "<strong>" not in rendered and "<a " not in rendered


def test_links_only_to_safe_urls():
    rendered = markdown_to_html(
        "[ok](https://example.org/x?a=1&b=2) [rel](figures/a.png) [anchor](#top) "
        "[bad](javascript:alert(1)) [worse](JaVaScRiPt:alert(2)) [data](data:text/html,x)\n")
    hrefs = [attributes["href"] for attributes in tags(rendered, "a")]
    assert hrefs == ["https://example.org/x?a=1&b=2", "figures/a.png", "#top"]
    assert "javascript:alert(1)" in rendered  # shown as text
    assert "data:text/html" in rendered and 'href="data' not in rendered


def test_headings_rules_and_paragraph_lines_joined():
    rendered = markdown_to_html("# One\n## Two\n#### Four\nline one\nline two\n\n---\n\nend\n")
    assert re.search(r'<h1 id="one">One</h1>\s*<h2 id="two">Two</h2>\s*<h4 id="four">Four</h4>',
                     rendered)
    assert "<p>line one\nline two</p>" in rendered
    assert "<br" not in rendered
    assert "<hr>" in rendered


# ---------------------------------------------------------------- the page


def write_figure(path: Path, color: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(2, 1.5), dpi=50)
    axes.plot([0, 1, 2], [0, 1, 0.5], color=color)
    axes.set_title("accuracy")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    plt.close(figure)


@pytest.fixture
def synthetic_run(tmp_path):
    """A run directory with two methods' Markdown, each with a PNG figure and a table."""
    run_dir = tmp_path / "run"
    for name, color in (("alpha", "tab:blue"), ("beta", "tab:red")):
        write_figure(run_dir / name / "figures" / "curve.png", color)
        (run_dir / name / f"{name}.md").write_text(
            f"# Method {name}\n\nSome text with `max_per_image` and λ = 0.5.\n\n"
            f"## Results\n\n| setting | accuracy |\n| --- | ---: |\n| a | 0.91 |\n| b | 0.88 |\n\n"
            f"## Figures\n\n![curve of {name}](figures/curve.png)\n\n"
            f"- inline: ![small](figures/curve.png)\n")
    return run_dir, [("Alpha method", "alpha/alpha.md"),
                     ("Beta method", run_dir / "beta" / "beta.md")]


def test_report_is_self_contained_with_nav_and_sections(synthetic_run):
    run_dir, sections = synthetic_run
    report = build_report(run_dir, sections, title="Synthetic <run>")
    assert report == run_dir / "report.html"
    page = report.read_text()
    images = tags(page, "img")
    assert len(images) == 4
    assert all(image["src"].startswith("data:image/png;base64,") for image in images)
    assert not re.search(r'(?:src|href)="(?!data:|#)', page)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert "<title>Synthetic &lt;run&gt;</title>" in page
    section_ids = [attributes["id"] for attributes in tags(page, "section")]
    assert section_ids == ["alpha-method", "beta-method"]
    topbar = page[page.index('<nav class="topbar"'):page.index("</nav>")]
    assert '<a href="#alpha-method">Alpha method</a>' in topbar
    assert '<a href="#beta-method">Beta method</a>' in topbar
    # each section's table of contents points at its own, unique heading ids
    assert '<a href="#alpha-method-results">Results</a>' in page
    assert '<a href="#beta-method-results">Results</a>' in page
    ids = [attributes["id"] for _, attributes in parse(page).elements if attributes.get("id")]
    assert len(ids) == len(set(ids))
    assert len(tags(page, "table")) == 2


def test_report_out_argument(synthetic_run, tmp_path):
    run_dir, sections = synthetic_run
    report = build_report(run_dir, sections, out=tmp_path / "elsewhere" / "page.html")
    assert report == tmp_path / "elsewhere" / "page.html" and report.is_file()
    assert not (run_dir / "report.html").exists()


def test_missing_image_names_the_file_and_the_markdown(synthetic_run):
    run_dir, sections = synthetic_run
    (run_dir / "beta" / "figures" / "curve.png").unlink()
    with pytest.raises(ValueError, match=r"curve\.png.*beta\.md"):
        build_report(run_dir, sections)


# ---------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


def open_report(browser, report: Path):
    """(page, console errors, page errors) of the report opened in a new page."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    console_errors, page_errors = [], []
    page.on("console", lambda message: message.type == "error"
            and console_errors.append(message.text))
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    page.on("request", lambda request: request.url.startswith(("http:", "https:"))
            and page_errors.append(f"network request {request.url}"))
    page.goto(report.as_uri(), wait_until="load")
    return page, console_errors, page_errors


IMAGES_LOADED = """() => Array.from(document.images).map(
    image => ({src: image.src.slice(0, 30), ok: image.complete && image.naturalWidth > 0}))"""


def test_report_in_chromium(synthetic_run, browser, tmp_path):
    run_dir, sections = synthetic_run
    report = build_report(run_dir, sections)
    page, console_errors, page_errors = open_report(browser, report)
    images = page.evaluate(IMAGES_LOADED)
    assert len(images) == 4 and all(image["ok"] for image in images), images

    page.click('nav.topbar a[href="#beta-method"]')
    page.wait_for_function("() => location.hash === '#beta-method'")
    top = page.evaluate("() => document.getElementById('beta-method').getBoundingClientRect().top")
    assert 0 <= top < 200  # scrolled to the section, just below the sticky bar
    assert page.evaluate("() => document.querySelector(':target').id") == "beta-method"

    page.evaluate("() => window.scrollTo(0, 0)")
    screenshot = tmp_path / "report.png"
    page.screenshot(path=screenshot, full_page=True)
    assert screenshot.stat().st_size > 1000
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert console_errors == [] and page_errors == []
    page.close()


def test_report_of_the_repository_results_in_chromium(browser, tmp_path):
    missing = [name for _, name in RESULT_SECTIONS if not (RESULTS / name).is_file()]
    if missing:
        pytest.skip(f"results files missing: {', '.join(missing)}")
    report = build_report(RESULTS, RESULT_SECTIONS, title="jfail results",
                          out=tmp_path / "report.html")
    page_html = report.read_text()
    assert not re.search(r'(?:src|href)="(?!data:|#)', page_html)
    page, console_errors, page_errors = open_report(browser, report)
    images = page.evaluate(IMAGES_LOADED)
    markdown_images = sum(len(re.findall(r"!\[", (RESULTS / name).read_text()))
                          for _, name in RESULT_SECTIONS)
    assert len(images) == markdown_images and all(image["ok"] for image in images), images
    assert page.evaluate("() => document.querySelectorAll('section.method').length") == 4
    assert page.evaluate("() => document.querySelectorAll('table').length") >= 20
    page.click('nav.topbar a[href="#prime"]')
    page.wait_for_function("() => location.hash === '#prime'")
    page.screenshot(path=tmp_path / "results.png")
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert console_errors == [] and page_errors == []
    page.close()
