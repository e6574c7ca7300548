"""A run's `report.html`: every method's Markdown in one self-contained page, figures inline.

Each pipeline (jfail/pipelines/*.py) writes a Markdown file and PNG figures that it references by
paths relative to that file. `build_report` renders those Markdown files into one HTML page:

- one section per method, with an anchor id and a small table of contents from its `##` headings;
- a sticky navigation bar at the top that links to every section;
- every image inlined as a `data:` URI, so the page needs no other file and loads nothing from the
  network (no CDN, no web fonts, no JavaScript; CSS in one `<style>` element).

`markdown_to_html` is the small Markdown renderer behind it. It covers what the pipelines write:
headings, paragraphs, nested bullet and numbered lists, pipe tables with alignment, fenced code,
inline code, bold, italic, links, images (inline too), horizontal rules. All text is HTML-escaped;
links go only to http(s), relative paths and #anchors (anything else stays plain text); an
underscore inside a word (`max_per_image`) never starts italics.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["build_report", "write_report", "rebuild_report", "markdown_to_html"]

SECTIONS_FILE = "report.json"
"""Where `write_report` records a run's sections, so `rebuild_report` (`jfail report`) can redo it."""

IMAGE_MIME_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".svg": "image/svg+xml",
    ".gif": "image/gif",
    ".webp": "image/webp",
}
"""The image files a report can inline, by extension, with the MIME type of their data URI."""


def build_report(
    run_dir: str | Path,
    sections: Sequence[tuple[str, str | Path]],
    *,
    title: str = "jfail report",
    out: str | Path | None = None,
) -> Path:
    """Write `run_dir/report.html` (or `out`) from `(method title, Markdown path)` sections.

    A Markdown path is absolute or relative to `run_dir`; the images it references are read
    relative to the Markdown file's folder and inlined. Raises FileNotFoundError for a missing
    Markdown file and ValueError for a missing or unsupported image (naming it and the Markdown
    that refers to it). Returns the path of the written page.
    """
    run_dir = Path(run_dir)
    out_path = Path(out) if out is not None else run_dir / "report.html"
    used_ids: set[str] = {"top"}
    rendered = []
    for method_title, markdown_path in sections:
        markdown_path = Path(markdown_path)
        if not markdown_path.is_absolute():
            markdown_path = run_dir / markdown_path
        if not markdown_path.is_file():
            raise FileNotFoundError(
                f"no Markdown file {markdown_path} for section {method_title!r}")
        section_id = _unique_id(_anchor_slug(method_title) or "section", used_ids)
        blocks, headings = _render_document(
            markdown_path.read_text(encoding="utf-8"),
            image_src=_inline_image_src(markdown_path),
            id_prefix=f"{section_id}-",
            used_ids=used_ids,
        )
        rendered.append((method_title, section_id,
                         _section_html(method_title, section_id, markdown_path, blocks, headings)))
    nav_links = "".join(f'<a href="#{section_id}">{html.escape(method_title)}</a>'
                        for method_title, section_id, _ in rendered)
    page = _PAGE_TEMPLATE.format(
        title=html.escape(title),
        css=_CSS,
        nav_links=nav_links,
        sections="\n".join(section_html for _, _, section_html in rendered),
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8")
    return out_path


def write_report(
    run_dir: str | Path, sections: Sequence[tuple[str, str | Path]], *, title: str = "jfail report"
) -> Path:
    """`build_report`, after recording the title and sections in `run_dir/report.json`."""
    import json

    run_dir = Path(run_dir)
    recorded = [[method_title, _relative_to(Path(path), run_dir)] for method_title, path in sections]
    (run_dir / SECTIONS_FILE).write_text(json.dumps({"title": title, "sections": recorded}, indent=2))
    return build_report(run_dir, sections, title=title)


def rebuild_report(run_dir: str | Path) -> Path:
    """Build `run_dir/report.html` again from the sections `write_report` recorded."""
    import json

    run_dir = Path(run_dir)
    record = run_dir / SECTIONS_FILE
    if not record.is_file():
        raise FileNotFoundError(
            f"{record} does not exist: only runs of `jfail demo` or `jfail <method>` record "
            "their report sections")
    saved = json.loads(record.read_text())
    return build_report(run_dir, [tuple(item) for item in saved["sections"]], title=saved["title"])


def markdown_to_html(text: str, *, image_src: Callable[[str], str] | None = None) -> str:
    """Render Markdown `text` to an HTML fragment.

    image_src maps an image's path as written in the Markdown to the `src` to use (for example
    a data URI); by default the path is kept if it is a safe URL (http(s), relative, data:image).
    """
    blocks, _ = _render_document(text, image_src=image_src, id_prefix="", used_ids=set())
    return "\n".join(block.html for block in blocks)


# --------------------------------------------------------------------------------------------
# Private helpers: the page.


@dataclasses.dataclass(frozen=True)
class _Block:
    """One rendered block: its kind ('heading1'..'heading6', 'paragraph', 'list', ...) and HTML."""

    kind: str
    html: str


@dataclasses.dataclass(frozen=True)
class _Heading:
    """A heading of a document: level (1 for #), anchor id, and its text as escaped HTML."""

    level: int
    anchor: str
    text_html: str


def _section_html(method_title: str, section_id: str, markdown_path: Path,
                  blocks: list[_Block], headings: list[_Heading]) -> str:
    """The `<section>` of one method: its Markdown's title, a table of contents, the rest."""
    if blocks and blocks[0].kind == "heading1":
        leading_title, blocks = blocks[0].html, blocks[1:]
    else:
        leading_title = f"<h1>{html.escape(method_title)}</h1>"
    toc_entries = [heading for heading in headings if heading.level == 2]
    toc = ""
    if toc_entries:
        toc_class = "toc toc-columns" if len(toc_entries) > 5 else "toc"
        toc = (f'<nav class="{toc_class}" aria-label="Contents of this section"><ul>' + "".join(
            f'<li><a href="#{heading.anchor}">{heading.text_html}</a></li>'
            for heading in toc_entries) + "</ul></nav>")
    body = "\n".join(block.html for block in blocks)
    return (
        f'<section class="method" id="{section_id}">\n'
        f'<header class="method-head"><p class="method-name">{html.escape(method_title)}'
        f'<span class="source">{html.escape(markdown_path.name)}</span></p>\n'
        f"{leading_title}\n{toc}</header>\n{body}\n</section>"
    )


def _inline_image_src(markdown_path: Path) -> Callable[[str], str]:
    """The image_src of one Markdown file: its images, read and inlined as data URIs."""

    def image_src(reference: str) -> str:
        if _SAFE_IMAGE_DATA.match(reference):
            return reference
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", reference) or reference.startswith("//"):
            raise ValueError(f"image {reference!r} in {markdown_path} is not a local file; "
                             "a report loads nothing from the network")
        path = Path(reference.split("#", 1)[0].split("?", 1)[0])
        if not path.is_absolute():
            path = markdown_path.parent / path
        mime_type = IMAGE_MIME_TYPES.get(path.suffix.lower())
        if mime_type is None:
            raise ValueError(f"image {path} referenced by {markdown_path} is not one of "
                             f"{', '.join(sorted(IMAGE_MIME_TYPES))}")
        if not path.is_file():
            raise ValueError(f"image {path} referenced by {markdown_path} does not exist")
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"data:{mime_type};base64,{encoded}"

    return image_src


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


_PAGE_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<nav class="topbar" id="top" aria-label="Methods">
<a class="brand" href="#top">{title}</a>
<div class="links">{nav_links}</div>
</nav>
<main>
{sections}
</main>
</body>
</html>
"""

_CSS = """
:root { color-scheme: light; --ink: #1f2328; --muted: #59636e; --line: #d1d9e0;
  --soft: #f6f8fa; --accent: #0b62c4; --bar: #15202b; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #eef1f4; line-height: 1.5;
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  "Noto Sans", "DejaVu Sans", sans-serif; }
.topbar { position: sticky; top: 0; z-index: 10; display: flex; flex-wrap: wrap;
  align-items: center; gap: 0.25rem 1.25rem; padding: 0.55rem 1.25rem; background: var(--bar);
  box-shadow: 0 1px 4px rgba(0, 0, 0, 0.25); }
.topbar a { color: #dce6f0; text-decoration: none; }
.topbar a:hover, .topbar a:focus { color: #fff; text-decoration: underline; }
.topbar .brand { color: #fff; font-weight: 650; margin-right: 0.5rem; }
.topbar .links { display: flex; flex-wrap: wrap; gap: 0.25rem 1rem; }
main { max-width: 1180px; margin: 0 auto; padding: 1.25rem 1rem 3rem; }
section.method { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 0.5rem 1.75rem 1.5rem; margin: 0 0 1.5rem; scroll-margin-top: 4rem; }
h1, h2, h3, h4, h5, h6 { scroll-margin-top: 4rem; line-height: 1.25; margin: 1.6em 0 0.6em; }
h1 { font-size: 1.65rem; margin-top: 0.2em; }
h2 { font-size: 1.3rem; padding-bottom: 0.25em; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.1rem; }
h4 { font-size: 1rem; }
.method-head { margin-bottom: 1rem; }
.method-name { margin: 0.75rem 0 0; color: var(--accent); font-size: 0.8rem; font-weight: 650;
  letter-spacing: 0.06em; text-transform: uppercase; }
.method-name .source { margin-left: 0.75rem; color: var(--muted); font-weight: 400;
  letter-spacing: 0; text-transform: none; font-family: ui-monospace, monospace; }
.toc { background: var(--soft); border: 1px solid var(--line); border-radius: 6px;
  padding: 0.5rem 1rem; font-size: 0.9rem; }
.toc ul { margin: 0; padding-left: 1.1rem; }
.toc-columns ul { columns: 2 22rem; column-gap: 2rem; }
.toc li { break-inside: avoid; margin: 0 0 0.2rem; }
a { color: var(--accent); }
p, ul, ol, pre, .table-wrap, figure { margin: 0 0 1rem; }
li > ul, li > ol { margin: 0.25rem 0 0.25rem; }
li { margin: 0.15rem 0; }
li > p { margin: 0.25rem 0; }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono",
  monospace; font-size: 0.88em; background: var(--soft); border: 1px solid #e3e8ee;
  border-radius: 4px; padding: 0.05em 0.3em; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px;
  padding: 0.75rem 1rem; overflow-x: auto; }
pre code { background: none; border: 0; padding: 0; font-size: 0.85rem; }
hr { border: 0; border-top: 1px solid var(--line); margin: 1.5rem 0; }
img { max-width: 100%; height: auto; vertical-align: middle; }
li > img { display: block; margin: 0.35rem 0 0.75rem; }
figure { margin: 0 0 1.25rem; text-align: center; }
figure img { border: 1px solid #e3e8ee; border-radius: 4px; background: #fff; }
figcaption { color: var(--muted); font-size: 0.85rem; margin-top: 0.3rem; }
.table-wrap { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.88rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 0.3rem 0.6rem; vertical-align: top; }
thead th { background: #e9eef3; font-weight: 600; text-align: left; vertical-align: bottom; }
tbody tr:nth-child(even) { background: #f8fafb; }
tbody tr:hover { background: #eef5fd; }
.align-left { text-align: left; }
.align-right { text-align: right; white-space: nowrap; }
.align-center { text-align: center; white-space: nowrap; }
"""


# --------------------------------------------------------------------------------------------
# Private helpers: block-level Markdown.

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$")
_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_RULE = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_LIST_ITEM = re.compile(r"^([ \t]*)([-*+]|\d{1,9}[.)])(?:[ \t]+(.*)|[ \t]*$)")
_TABLE_SEPARATOR = re.compile(r"^[ \t]*\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$")


def _render_document(text: str, *, image_src: Callable[[str], str] | None, id_prefix: str,
                     used_ids: set[str]) -> tuple[list[_Block], list[_Heading]]:
    """(blocks, headings) of a Markdown document; heading anchors are id_prefix + slug, unique."""
    renderer = _BlockRenderer(_InlineRenderer(image_src), id_prefix, used_ids)
    text = text.replace("\x00", "\ufffd").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.expandtabs(4).split("\n")
    return renderer.blocks(lines), renderer.headings


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_blank(line: str) -> bool:
    return not line.strip()


class _BlockRenderer:
    """Splits lines into blocks (headings, paragraphs, lists, tables, code, rules), renders them."""

    def __init__(self, inline: _InlineRenderer, id_prefix: str, used_ids: set[str]):
        self.inline = inline
        self.id_prefix = id_prefix
        self.used_ids = used_ids
        self.headings: list[_Heading] = []

    def blocks(self, lines: list[str], *, tight: bool = False) -> list[_Block]:
        """The blocks of `lines`; tight: paragraphs without `<p>` (items of a tight list)."""
        blocks: list[_Block] = []
        index = 0
        while index < len(lines):
            line = lines[index]
            if _is_blank(line):
                index += 1
            elif fence := _FENCE.match(line):
                block, index = self._code(lines, index, fence)
                blocks.append(block)
            elif heading := _HEADING.match(line):
                blocks.append(self._heading(len(heading.group(1)), heading.group(2) or ""))
                index += 1
            elif _RULE.match(line):
                blocks.append(_Block("rule", "<hr>"))
                index += 1
            elif _LIST_ITEM.match(line):
                block, index = self._list(lines, index)
                blocks.append(block)
            elif self._starts_table(lines, index):
                block, index = self._table(lines, index)
                blocks.append(block)
            else:
                block, index = self._paragraph(lines, index, tight=tight)
                blocks.append(block)
        return blocks

    def _starts_block(self, lines: list[str], index: int) -> bool:
        """Whether lines[index] starts a block other than a paragraph (so it ends a paragraph).

        As in CommonMark, a numbered line interrupts a paragraph only as `1.` (so a wrapped
        line that starts with, say, "2024. " stays in its paragraph).
        """
        line = lines[index]
        item = _LIST_ITEM.match(line)
        return bool(_is_blank(line) or _FENCE.match(line) or _HEADING.match(line)
                    or _RULE.match(line) or (item and item.group(2)[:-1] in ("", "1"))
                    or self._starts_table(lines, index))

    @staticmethod
    def _starts_table(lines: list[str], index: int) -> bool:
        return ("|" in lines[index] and index + 1 < len(lines)
                and "-" in lines[index + 1] and bool(_TABLE_SEPARATOR.match(lines[index + 1])))

    def _heading(self, level: int, text: str) -> _Block:
        text_html = self.inline.render(text)
        plain_html = _strip_tags(text_html)
        slug = _anchor_slug(html.unescape(plain_html)) or "section"
        anchor = _unique_id(self.id_prefix + slug, self.used_ids)
        self.headings.append(_Heading(level, anchor, plain_html))
        return _Block(f"heading{level}", f'<h{level} id="{anchor}">{text_html}</h{level}>')

    def _code(self, lines: list[str], index: int, fence: re.Match) -> tuple[_Block, int]:
        marker, language = fence.group(1), fence.group(2)
        indent = _indent_of(lines[index])
        body: list[str] = []
        index += 1
        while index < len(lines):
            line = lines[index]
            stripped = line.strip()
            if stripped.startswith(marker[0] * len(marker)) and not stripped.strip(marker[0]):
                index += 1
                break
            body.append(line[min(indent, _indent_of(line)):])
            index += 1
        language_class = (f' class="language-{html.escape(language)}"'
                          if re.fullmatch(r"[\w+.-]+", language) else "")
        code = html.escape("\n".join(body))
        return _Block("code", f"<pre><code{language_class}>{code}</code></pre>"), index

    def _paragraph(self, lines: list[str], index: int, *, tight: bool) -> tuple[_Block, int]:
        text_lines = [lines[index].strip()]
        index += 1
        while index < len(lines) and not self._starts_block(lines, index):
            text_lines.append(lines[index].strip())
            index += 1
        figures = self.inline.figures("\n".join(text_lines))
        if figures is not None:
            return _Block("figures", figures), index
        text_html = self.inline.render("\n".join(text_lines))
        return _Block("paragraph", text_html if tight else f"<p>{text_html}</p>"), index

    def _table(self, lines: list[str], index: int) -> tuple[_Block, int]:
        header = _table_cells(lines[index])
        alignments = [_alignment(cell) for cell in _table_cells(lines[index + 1])]
        alignments = (alignments + [""] * len(header))[:len(header)]
        index += 2
        rows = []
        while index < len(lines) and "|" in lines[index] and not _is_blank(lines[index]):
            cells = _table_cells(lines[index])
            rows.append((cells + [""] * len(header))[:len(header)])
            index += 1

        def cell(tag: str, text: str, alignment: str) -> str:
            attribute = f' class="align-{alignment}"' if alignment else ""
            return f"<{tag}{attribute}>{self.inline.render(text)}</{tag}>"

        head = "".join(cell("th", text, align) for text, align in zip(header, alignments))
        body = "".join(
            "<tr>" + "".join(cell("td", text, align) for text, align in zip(row, alignments))
            + "</tr>\n" for row in rows)
        table = (f'<div class="table-wrap"><table>\n<thead><tr>{head}</tr></thead>\n'
                 f"<tbody>\n{body}</tbody>\n</table></div>")
        return _Block("table", table), index

    def _list(self, lines: list[str], index: int) -> tuple[_Block, int]:
        """A list whose first item is lines[index]; items of the same kind at the same indent."""
        first = _LIST_ITEM.match(lines[index])
        list_indent = len(first.group(1))
        ordered = first.group(2)[0].isdigit()
        start = int(first.group(2)[:-1]) if ordered else 1
        items: list[list[str]] = []
        loose = False

        def is_sibling(item: re.Match | None) -> bool:
            return (item is not None and len(item.group(1)) == list_indent
                    and item.group(2)[0].isdigit() == ordered)

        while index < len(lines):
            if _is_blank(lines[index]):
                following = index
                while following < len(lines) and _is_blank(lines[following]):
                    following += 1
                if following == len(lines) or not is_sibling(_LIST_ITEM.match(lines[following])):
                    break
                index, loose = following, True
            item = _LIST_ITEM.match(lines[index])
            if not is_sibling(item):
                break
            item_lines, index = self._item_lines(lines, index, item)
            items.append(item_lines)
        rendered_items = []
        for item_lines in items:
            while item_lines and _is_blank(item_lines[-1]):
                item_lines.pop()
            item_tight = not loose and not any(_is_blank(line) for line in item_lines)
            body = "\n".join(block.html for block in self.blocks(item_lines, tight=item_tight))
            rendered_items.append(f"<li>{body}</li>")
        tag = "ol" if ordered else "ul"
        start_attribute = f' start="{start}"' if ordered and start != 1 else ""
        return _Block("list", f"<{tag}{start_attribute}>\n" + "\n".join(rendered_items)
                      + f"\n</{tag}>"), index

    def _item_lines(self, lines: list[str], index: int,
                    item: re.Match) -> tuple[list[str], int]:
        """The lines of one list item, dedented to its content, and the index after it.

        An item goes on over lines indented more than its marker, over blank lines followed by
        such a line, and over unindented lines that continue its paragraph (lazy continuation).
        """
        marker_indent = len(item.group(1))
        first_text = item.group(3) or ""
        content_indent = marker_indent + len(item.group(2)) + 1
        if item.group(3) is not None:
            content_indent = len(lines[index]) - len(first_text)
        item_lines = [first_text]
        index += 1
        while index < len(lines):
            line = lines[index]
            if _is_blank(line):
                following = index + 1
                while following < len(lines) and _is_blank(lines[following]):
                    following += 1
                if following < len(lines) and _indent_of(lines[following]) > marker_indent:
                    item_lines.extend([""] * (following - index))
                    index = following
                    continue
                break
            indent = _indent_of(line)
            if indent > marker_indent:
                item_lines.append(line[min(indent, content_indent):])
            elif (not _is_blank(item_lines[-1]) and not _LIST_ITEM.match(line)
                  and not self._starts_block(lines, index)):
                item_lines.append(line)
            else:
                break
            index += 1
        return item_lines, index


def _table_cells(line: str) -> list[str]:
    """The cells of a pipe-table row; `\\|` is a pipe inside a cell (kept escaped)."""
    row = line.strip()
    if row.startswith("|"):
        row = row[1:]
    if row.endswith("|") and not row.endswith("\\|"):
        row = row[:-1]
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row)]


def _alignment(separator_cell: str) -> str:
    left, right = separator_cell.startswith(":"), separator_cell.endswith(":")
    return "center" if left and right else "right" if right else "left" if left else ""


def _strip_tags(fragment: str) -> str:
    """An HTML fragment without its tags (its text stays escaped)."""
    return re.sub(r"<[^>]*>", "", fragment)


# --------------------------------------------------------------------------------------------
# Private helpers: inline Markdown.

_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
_SAFE_URL = re.compile(r"^(?:https?://|#|/(?!/)|\./|\.\./|[^:/?#]+(?:[/?#]|$))", re.IGNORECASE)
_SAFE_IMAGE_DATA = re.compile(r"^data:image/(?:png|jpeg|gif|webp|svg\+xml);base64,[A-Za-z0-9+/=]*$")
_LINK_TARGET = re.compile(r'\(\s*(<[^<>\n]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)'
                          r'(?:\s+"([^"\n]*)")?\s*\)')
_INLINE_SPECIAL = re.compile(r"[\\`!\[]")
_SLOT = "\x00{}\x00"
_SLOT_PATTERN = re.compile("\x00(\\d+)\x00")
_EMPHASIS_PATTERNS = (
    ("strong", re.compile(r"\*\*(?=[^\s*])(.+?)(?<=[^\s*])\*\*", re.DOTALL)),
    ("strong", re.compile(r"(?<![\w\\])__(?=[^\s_])(.+?)(?<=[^\s_])__(?!\w)", re.DOTALL)),
    ("em", re.compile(r"(?<![*\w])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?!\*)", re.DOTALL)),
    ("em", re.compile(r"(?:^|(?<=[\s(\[\"]))_(?=[^\s_])(.+?)(?<=[^\s_])_(?=$|[\s.,;:!?)\]\"'])",
                      re.DOTALL)),
)


def _is_safe_url(url: str) -> bool:
    """http(s), a relative path or an #anchor; nothing with another scheme (javascript:, ...)."""
    compact = re.sub(r"[\x00-\x20]", "", url)
    return bool(_SAFE_URL.match(compact)) and not compact.lower().startswith("//")


class _InlineRenderer:
    """Inline Markdown (code, images, links, emphasis, escapes) to escaped HTML."""

    def __init__(self, image_src: Callable[[str], str] | None):
        self.image_src = image_src

    def render(self, text: str) -> str:
        """The HTML of one span of inline Markdown (a paragraph, a table cell, a heading)."""
        slots: list[str] = []
        plain = self._tokenize(text, slots, allow_links=True)
        return self._fill(self._emphasis(plain), slots)

    def figures(self, text: str) -> str | None:
        """Figures for a paragraph made of images only; None when it has anything else."""
        images = list(re.finditer(r"!\[([^\]\n]*)\]" + _LINK_TARGET.pattern, text))
        remainder = re.sub(r"!\[([^\]\n]*)\]" + _LINK_TARGET.pattern, "", text)
        if not images or remainder.strip():
            return None
        return "\n".join(
            f"<figure>{self._image(image.group(1), image.group(2), image.group(3))}"
            f"<figcaption>{html.escape(self._unescape(image.group(1)))}</figcaption></figure>"
            for image in images)

    def _tokenize(self, text: str, slots: list[str], *, allow_links: bool) -> str:
        """text, escaped, with code, images, links and escaped characters replaced by slots."""
        pieces: list[str] = []
        index = 0
        while index < len(text):
            char = text[index]
            if char == "\\" and index + 1 < len(text) and text[index + 1] in _PUNCTUATION:
                pieces.append(self._slot(slots, html.escape(text[index + 1])))
                index += 2
            elif char == "`":
                run = len(text[index:]) - len(text[index:].lstrip("`"))
                closing = re.compile(r"(?<!`)" + "`" * run + r"(?!`)").search(text, index + run)
                if closing is None:
                    pieces.append(html.escape(text[index:index + run]))
                    index += run
                    continue
                code = text[index + run:closing.start()].replace("\n", " ")
                if code.startswith(" ") and code.endswith(" ") and code.strip():
                    code = code[1:-1]
                pieces.append(self._slot(slots, f"<code>{html.escape(code)}</code>"))
                index = closing.end()
            elif char == "!" and text.startswith("![", index) and (
                    image := self._bracketed(text, index + 1)):
                alt, url, title, end = image
                pieces.append(self._slot(slots, self._image(alt, url, title)))
                index = end
            elif char == "[" and allow_links and (link := self._bracketed(text, index)):
                label, url, title, end = link
                target = url[1:-1] if url.startswith("<") else url
                if _is_safe_url(target):
                    label_html = self._fill(
                        self._emphasis(self._tokenize(label, slots, allow_links=False)), slots)
                    title_attribute = f' title="{html.escape(title)}"' if title else ""
                    link_html = (f'<a href="{html.escape(target)}"{title_attribute}>'
                                 f"{label_html}</a>")
                    pieces.append(self._slot(slots, link_html))
                else:
                    pieces.append(self._slot(slots, html.escape(text[index:end])))
                index = end
            else:
                next_special = _INLINE_SPECIAL.search(text, index + 1)
                stop = next_special.start() if next_special else len(text)
                pieces.append(html.escape(text[index:stop], quote=False))
                index = stop
        return "".join(pieces)

    @staticmethod
    def _bracketed(text: str, index: int) -> tuple[str, str, str | None, int] | None:
        """(label, url, title, end) of `[label](url "title")` starting at text[index] == '['."""
        depth, position = 0, index
        while position < len(text):
            char = text[position]
            if char == "\\":
                position += 2
                continue
            if char == "[":
                depth += 1
            elif char == "]":
                depth -= 1
                if depth == 0:
                    break
            position += 1
        else:
            return None
        target = _LINK_TARGET.match(text, position + 1)
        if target is None:
            return None
        return text[index + 1:position], target.group(1), target.group(2), target.end()

    def _image(self, alt: str, url: str, title: str | None) -> str:
        target = url[1:-1] if url.startswith("<") else url
        if self.image_src is not None:
            src = self.image_src(target)
        elif _is_safe_url(target) or _SAFE_IMAGE_DATA.match(target):
            src = target
        else:
            return html.escape(f"![{alt}]({url})")
        title_attribute = f' title="{html.escape(title)}"' if title else ""
        return (f'<img src="{html.escape(src)}" alt="{html.escape(self._unescape(alt))}"'
                f"{title_attribute}>")

    @staticmethod
    def _unescape(text: str) -> str:
        """Markdown text without its backslash escapes (for alt text and captions)."""
        return re.sub(r"\\([" + re.escape(_PUNCTUATION) + "])", r"\1", text)

    @staticmethod
    def _slot(slots: list[str], fragment: str) -> str:
        slots.append(fragment)
        return _SLOT.format(len(slots) - 1)

    @staticmethod
    def _emphasis(text: str) -> str:
        for tag, pattern in _EMPHASIS_PATTERNS:
            text = pattern.sub(lambda match, tag=tag: f"<{tag}>{match.group(1)}</{tag}>", text)
        return text

    @staticmethod
    def _fill(text: str, slots: list[str]) -> str:
        while _SLOT_PATTERN.search(text):
            text = _SLOT_PATTERN.sub(lambda match: slots[int(match.group(1))], text)
        return text

