"""Reports from structured results: each method's `results/<name>.md` and a run's `report.html`.

Every pipeline (jfail/pipelines/*.py) writes its structured result as JSON and renders its
Markdown from that same dict with a Jinja2 template, `jfail/templates/<method>.j2`. The template
is written once against a small set of block macros (heading, paragraph, table, list, code,
images); `_markdown.j2` renders them as Markdown, `_html.j2` as HTML. So `report.html` is
rendered from the structured results themselves, never parsed back from the Markdown.

`build_report` puts a run's sections into one self-contained page:

- one section per method, with an anchor id and a small table of contents from its `##` headings;
- a sticky navigation bar at the top that links to every section;
- every image inlined as a `data:` URI, so the page needs no other file and loads nothing from the
  network (no CDN, no web fonts, no JavaScript; CSS in one `<style>` element).

A section is either a structured result (`Result`: a template name and the JSON path) or a plain
Markdown file (a run's overview, or Markdown written elsewhere), which markdown-it-py renders
(CommonMark with pipe tables). Free text inside a structured result (a paragraph, a table cell)
is Markdown too and goes through the same renderer. All text is HTML-escaped; raw HTML in
Markdown stays text; links go nowhere but http(s), relative paths and #anchors.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import html
import json
import math
import re
import unicodedata
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jinja2
from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml
from markdown_it.token import Token

__all__ = ["Result", "build_report", "write_report", "rebuild_report", "markdown_to_html",
           "render_markdown"]

SECTIONS_FILE = "report.json"
"""Where `write_report` records a run's sections, for `rebuild_report` (`jfail report`)."""

TEMPLATES = Path(__file__).parent / "templates"
"""The package's Jinja2 templates: one per method, the two block libraries, the page."""

IMAGE_MIME_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".svg": "image/svg+xml",
    ".gif": "image/gif",
    ".webp": "image/webp",
}
"""The image files a report can inline, by extension, with the MIME type of their data URI."""


@dataclasses.dataclass(frozen=True)
class Result:
    """A section rendered from a structured result.

    template: the name of its template in `jfail/templates` (`"prime"` for `prime.j2`);
    path: its JSON file; the figures it names are relative to the JSON's folder, and the file's
    stem is the `name` the template sees (the prefix of the figure folder).
    """

    template: str
    path: str | Path


Section = tuple[str, "str | Path | Result"]
"""(method title, source): the source is a Markdown file's path or a `Result`."""


def render_markdown(template: str, result: Mapping, *, name: str) -> str:
    """The Markdown of a structured result: `jfail/templates/<template>.j2` with Markdown blocks.

    Args:
      template: the template's name, e.g. "prime".
      result: the structured result, as written to (and read back from) its JSON file.
      name: the stem of the result's files (`prime_fmnist` for `results/prime_fmnist.json`);
        figures live under `<name>/` beside it.
    Returns:
      The Markdown text.
    Raises:
      ValueError: for an unknown template, or a result without a field the template shows.
    """
    return str(_template_module(template, result, name=name, blocks="_markdown.j2"))


def build_report(
    run_dir: str | Path,
    sections: Sequence[Section],
    *,
    title: str = "jfail report",
    out: str | Path | None = None,
) -> Path:
    """Write `run_dir/report.html` (or `out`) from `(method title, source)` sections.

    A source path is absolute or relative to `run_dir`; the images a section references are read
    relative to its file's folder and inlined. Raises FileNotFoundError for a missing source
    file and ValueError for a missing or unsupported image (naming it and the file that refers
    to it). Returns the path of the written page.
    """
    run_dir = Path(run_dir)
    out_path = Path(out) if out is not None else run_dir / "report.html"
    used_ids: set[str] = {"top"}
    rendered = []
    for method_title, source in sections:
        template = source.template if isinstance(source, Result) else None
        path = Path(source.path if isinstance(source, Result) else source)
        if not path.is_absolute():
            path = run_dir / path
        if not path.is_file():
            kind = "result" if template else "Markdown"
            raise FileNotFoundError(f"no {kind} file {path} for section {method_title!r}")
        section_id = _unique_id(_anchor_slug(method_title) or "section", used_ids)
        anchors = _Anchors(f"{section_id}-", used_ids)
        env = {"image_src": _inline_image_src(path), "anchors": anchors}
        if template:
            result = json.loads(path.read_text(encoding="utf-8"))
            module = _template_module(template, result, name=path.stem, blocks="_html.j2",
                                      env=env)
            heading, body = str(getattr(module, "title", "")), str(module)
            heading_html = _MARKDOWN.renderInline(heading, env) if heading else ""
            if heading_html:
                heading_html = _h1(anchors.add(1, heading_html), heading_html)
        else:
            heading_html, body = _markdown_document(path.read_text(encoding="utf-8"), env)
        rendered.append({
            "id": section_id,
            "title": method_title,
            "source": path.name,
            "heading_html": heading_html,
            "toc": [entry for entry in anchors.headings if entry["level"] == 2],
            "body": body,
        })
    page = _environment().get_template("report.html.j2").render(title=title, sections=rendered)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8")
    return out_path


def write_report(run_dir: str | Path, sections: Sequence[Section], *,
                 title: str = "jfail report") -> Path:
    """`build_report`, after recording the title and sections in `run_dir/report.json`."""
    run_dir = Path(run_dir)
    recorded = []
    for method_title, source in sections:
        if isinstance(source, Result):
            recorded.append([method_title, {"template": source.template,
                                            "result": _relative_to(Path(source.path), run_dir)}])
        else:
            recorded.append([method_title, _relative_to(Path(source), run_dir)])
    (run_dir / SECTIONS_FILE).write_text(json.dumps({"title": title, "sections": recorded},
                                                    indent=2))
    return build_report(run_dir, sections, title=title)


def rebuild_report(run_dir: str | Path) -> Path:
    """Build `run_dir/report.html` again from the sections `write_report` recorded."""
    run_dir = Path(run_dir)
    record = run_dir / SECTIONS_FILE
    if not record.is_file():
        raise FileNotFoundError(
            f"{record} does not exist: only runs of `jfail demo` or `jfail <method>` record "
            "their report sections")
    saved = json.loads(record.read_text())
    sections = [(method_title, Result(source["template"], source["result"])
                 if isinstance(source, dict) else source)
                for method_title, source in saved["sections"]]
    return build_report(run_dir, sections, title=saved["title"])


def markdown_to_html(text: str, *, image_src: Callable[[str], str] | None = None) -> str:
    """Render Markdown `text` to an HTML fragment (markdown-it-py: CommonMark, pipe tables).

    image_src maps an image's path as written in the Markdown to the `src` to use (for example
    a data URI); by default the path is kept (markdown-it refuses unsafe URLs).
    """
    env = {"image_src": image_src, "anchors": _Anchors("", set())}
    return _MARKDOWN.render(text, env).rstrip("\n")


# --------------------------------------------------------------------------------------------
# Private helpers: templates.


@functools.cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
        extensions=["jinja2.ext.do", "jinja2.ext.loopcontrols"],
    )
    environment.filters.update(fmt=format, pct=_percent, num=_number, mean=_mean, median=_median,
                               plural=_plural, basename_of_path=lambda path: Path(path).name,
                               parent_of_path=lambda path: str(Path(path).parent),
                               stem_of_path=lambda path: Path(path).stem,
                               escape_text=escapeHtml)  # as markdown-it escapes text
    return environment


def _template_module(template: str, result: Mapping, *, name: str, blocks: str,
                     env: dict | None = None):
    """The rendered template as a module: str() is its body, attributes its exported names."""

    def inline(text) -> str:
        return _MARKDOWN.renderInline(str(text), env)

    def anchor(level: int, text) -> str:
        return env["anchors"].add(level, inline(text))

    def image(path: str) -> str:
        return html.escape(env["image_src"](path))

    context = {"r": result, "name": name, "blocks": blocks, "inline": inline, "anchor": anchor,
               "image_src": image}
    try:
        source = _environment().get_template(f"{template}.j2")
    except jinja2.TemplateNotFound:
        known = sorted(path.stem for path in TEMPLATES.glob("[!_]*.j2") if "." not in path.stem)
        raise ValueError(f"no report template {template!r}; known: {', '.join(known)}") from None
    try:
        return source.make_module(context)
    except jinja2.UndefinedError as error:
        raise ValueError(f"the structured result given to template {template!r} lacks a field "
                         f"it shows ({error}); pass the dict the pipeline wrote as JSON") from None


def _percent(value, digits: int = 1) -> str:
    """`12.3 %` for 0.123; "–" where the value is missing (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.{digits}f} %"


def _number(value, spec: str) -> str:
    """A number formatted with `spec`, or "–" where it is missing (None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _mean(values) -> float:
    import numpy as np

    return float(np.mean(list(values)))


def _median(values) -> float:
    import numpy as np

    return float(np.median(values))


def _plural(count, word: str) -> str:
    """'tag' for one, 'tags' for more."""
    return word if int(count) == 1 else f"{word}s"


# --------------------------------------------------------------------------------------------
# Private helpers: Markdown to HTML.


class _Anchors:
    """Unique heading ids of one section (prefix + slug) and the headings, in order."""

    def __init__(self, prefix: str, used_ids: set[str]):
        self.prefix = prefix
        self.used_ids = used_ids
        self.headings: list[dict] = []

    def add(self, level: int, text_html: str) -> str:
        plain_html = re.sub(r"<[^>]*>", "", text_html)
        anchor = _unique_id(self.prefix + (_anchor_slug(html.unescape(plain_html)) or "section"),
                            self.used_ids)
        self.headings.append({"level": level, "anchor": anchor, "text_html": plain_html})
        return anchor


def _markdown_document(text: str, env: dict) -> tuple[str, str]:
    """(its leading `#` heading as `<h1>` or "", the rest) of a Markdown document, as HTML."""
    tokens = _MARKDOWN.parse(text, env)
    heading = ""
    if len(tokens) >= 3 and tokens[0].type == "heading_open" and tokens[0].tag == "h1":
        text_html = _MARKDOWN.renderer.render(tokens[1].children, _MARKDOWN.options, env)
        heading = _h1(env["anchors"].add(1, text_html), text_html)
        tokens = tokens[3:]
    return heading, _MARKDOWN.renderer.render(tokens, _MARKDOWN.options, env)


def _h1(anchor: str, text_html: str) -> str:
    return f'<h1 id="{anchor}">{text_html}</h1>'


def _markdown() -> MarkdownIt:
    """markdown-it-py as the reports use it: CommonMark and tables, raw HTML shown as text."""
    md = MarkdownIt("commonmark", {"html": False, "xhtmlOut": False}).enable("table")
    md.core.ruler.push("figures", _mark_figures)
    rules = md.renderer.rules
    default_image = rules["image"]

    def heading_open(tokens, idx, options, env):
        token = tokens[idx]
        level = int(token.tag[1])
        text_html = md.renderer.render(tokens[idx + 1].children, options, env)
        token.attrSet("id", env["anchors"].add(level, text_html))
        return md.renderer.renderToken(tokens, idx, options, env)

    def cell_open(tokens, idx, options, env):
        token = tokens[idx]
        style = token.attrs.pop("style", None)
        if style:
            token.attrSet("class", "align-" + str(style).split(":", 1)[1])
        return md.renderer.renderToken(tokens, idx, options, env)

    def list_close(tokens, idx, options, env):
        nested = tokens[idx].level > 0
        return f"</{tokens[idx].tag}>" + ("" if nested else "\n")

    def image(tokens, idx, options, env):
        token = tokens[idx]
        image_src = (env or {}).get("image_src")
        if image_src is not None:
            token.attrSet("src", image_src(urllib.parse.unquote(str(token.attrGet("src")))))
        rendered = default_image(tokens, idx, options, env)
        if token.meta.get("figure"):
            caption = html.escape(token.content)
            return f"<figure>{rendered}<figcaption>{caption}</figcaption></figure>\n"
        return rendered

    def code(rule):
        def without_last_newline(tokens, idx, options, env):
            tokens[idx].content = tokens[idx].content.removesuffix("\n")
            return rule(tokens, idx, options, env)

        return without_last_newline

    def hidden_if_figures(tokens, idx, options, env):
        if tokens[idx].meta.get("figures"):
            return ""
        return md.renderer.renderToken(tokens, idx, options, env)

    rules.update(
        fence=code(rules["fence"]), code_block=code(rules["code_block"]),
        heading_open=heading_open, th_open=cell_open, td_open=cell_open, image=image,
        bullet_list_close=list_close, ordered_list_close=list_close,
        paragraph_open=hidden_if_figures, paragraph_close=hidden_if_figures,
        table_open=lambda *_: '<div class="table-wrap"><table>\n',
        table_close=lambda *_: "</table></div>\n",
    )
    return md


def _mark_figures(state) -> None:
    """A paragraph of images only becomes figures with captions (their alt text)."""
    tokens: list[Token] = state.tokens
    for index in range(len(tokens) - 2):
        opening, inline = tokens[index], tokens[index + 1]
        if opening.type != "paragraph_open" or opening.hidden or inline.type != "inline":
            continue
        children = inline.children or []
        images = [child for child in children if child.type == "image"]
        others = [child for child in children if child.type != "image"
                  and not (child.type in ("softbreak", "hardbreak")
                           or (child.type == "text" and not child.content.strip()))]
        if not images or others:
            continue
        opening.meta["figures"] = tokens[index + 2].meta["figures"] = True
        for child in images:
            child.meta["figure"] = True
        inline.children = images


_MARKDOWN = _markdown()


# --------------------------------------------------------------------------------------------
# Private helpers: the page.


def _inline_image_src(source_path: Path) -> Callable[[str], str]:
    """The image_src of one section's file: its images, read and inlined as data URIs."""

    def image_src(reference: str) -> str:
        if _SAFE_IMAGE_DATA.match(reference):
            return reference
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", reference) or reference.startswith("//"):
            raise ValueError(f"image {reference!r} in {source_path} is not a local file; "
                             "a report loads nothing from the network")
        path = Path(reference.split("#", 1)[0].split("?", 1)[0])
        if not path.is_absolute():
            path = source_path.parent / path
        mime_type = IMAGE_MIME_TYPES.get(path.suffix.lower())
        if mime_type is None:
            raise ValueError(f"image {path} referenced by {source_path} is not one of "
                             f"{', '.join(sorted(IMAGE_MIME_TYPES))}")
        if not path.is_file():
            raise ValueError(f"image {path} referenced by {source_path} does not exist")
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"data:{mime_type};base64,{encoded}"

    return image_src


_SAFE_IMAGE_DATA = re.compile(r"^data:image/(?:png|jpeg|gif|webp|svg\+xml);base64,[A-Za-z0-9+/=]*$")


def _relative_to(path: Path, run_dir: Path) -> str:
    """`path` relative to `run_dir` when it lies inside it (the run directory can move)."""
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)


def _anchor_slug(text: str) -> str:
    """An ASCII anchor id from text: 'Figure 4: λ sweep' -> 'figure-4-sweep'."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")


def _unique_id(candidate: str, used_ids: set[str]) -> str:
    """candidate, or candidate-2, -3, ... : the first not in used_ids (which it joins)."""
    anchor, number = candidate, 2
    while anchor in used_ids:
        anchor, number = f"{candidate}-{number}", number + 1
    used_ids.add(anchor)
    return anchor
