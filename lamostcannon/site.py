"""The static site: the executed notebooks of ``make reproduce`` as HTML pages, with an index that
is the README's notebook and figure maps (linked) and the claims table.

``python -m lamostcannon site`` (``make site``) reads ``build/notebooks/*.ipynb`` and
``build/claims/*.json`` and writes ``build/site/``: ``index.html``, one ``<notebook>.html`` per
executed notebook with its images in ``<notebook>_files/``, and ``claims.csv``. Nothing is
executed again, and nothing is fetched: the pages load no script from the network (math is
rendered to inline SVG with matplotlib's mathtext when the site is built; progress-bar widgets
show their finished text, :func:`lamostcannon.nbtools.tidy_executed`), so the site reads the
same offline as online.

The tool is nbconvert's HTML exporter (already the project's notebook executor's sibling) with a
small template, ``lamostcannon/site_template/lamostcannon``, that extends JupyterLab's look: it
anchors each figure that :func:`lamostcannon.plotting.savefig` showed as ``#fig-<name>`` and
captions it with the paper figure it reproduces (:mod:`lamostcannon.plotting.figure_map`).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import paths

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent / "site_template"

_CSS = """
.lc-nav, .lc-footer { font: 14px/1.5 system-ui, sans-serif; padding: 8px 16px; }
.lc-nav { position: sticky; top: 0; background: #f4f6f8; border-bottom: 1px solid #d0d7de;
  z-index: 10; }
.lc-nav a { margin-right: 1.2em; }
.lc-footer { color: #57606a; border-top: 1px solid #d0d7de; margin-top: 2em; }
figure.lc-figure { margin: 0.5em 0 1em 0; }
figure.lc-figure figcaption { font: 13px/1.4 system-ui, sans-serif; color: #24292f;
  background: #eef6ff; border-left: 3px solid #0969da; padding: 4px 8px; margin-top: 4px; }
figure.lc-figure figcaption b { color: #0969da; }
img.lc-math { vertical-align: middle; }
pre.progress { color: #1a7f37; }
"""

_INDEX_CSS = """
body { font: 15px/1.55 system-ui, sans-serif; max-width: 1200px; margin: 0 auto; padding: 0 20px;
  color: #24292f; }
h1 { font-size: 1.7em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 13.5px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f4f6f8; }
code { background: #f4f6f8; padding: 1px 4px; border-radius: 4px; font-size: 90%; }
.missing { color: #9a6700; }
.v-agrees { background: #dafbe1; } .v-differs { background: #ffebe9; }
.v-not-comparable, .v-reported { background: #f6f8fa; } .v-inconclusive { background: #fff8c5; }
.v-not-recorded { color: #8c959f; }
nav.toc a { margin-right: 1.2em; }
"""


@dataclass
class SiteReport:
    """What :func:`build_site` wrote.

    Attributes
    ----------
    out_dir : the site folder
    index : ``index.html``
    pages : notebook name -> page path
    figures : figure name -> ``"<page>.html#fig-<name>"``
    not_executed : notebooks of ``notebooks/`` without an executed copy (listed, not linked)
    titles : notebook name -> its title (its first heading)
    """

    out_dir: Path
    index: Path
    pages: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    not_executed: list = field(default_factory=list)
    titles: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- math
_FENCE = re.compile(r"(```.*?```|~~~.*?~~~|`[^`\n]*`)", re.S)
_DISPLAY = re.compile(r"\$\$(.+?)\$\$", re.S)
_INLINE = re.compile(r"(?<![\\$\w])\$(?![\s$])([^$\n]+?)(?<![\s\\])\$(?![\w$])")


def _svg_math(tex: str, *, display: bool = False, cache: dict | None = None) -> str:
    """``<img>`` with the TeX rendered by matplotlib's mathtext as an inline SVG, or the TeX in
    ``<code>`` when mathtext cannot parse it."""
    key = (tex, display)
    if cache is not None and key in cache:
        return cache[key]
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from matplotlib.mathtext import MathTextParser

    size = 16.0 if display else 14.5
    expr = f"${tex.strip()}$"
    try:
        with matplotlib.rc_context({"mathtext.fontset": "cm", "svg.hashsalt": "lamostcannon",
                                    "svg.fonttype": "path"}):
            prop = FontProperties(size=size)
            width, height, depth, _, _ = MathTextParser("path").parse(expr, dpi=72, prop=prop)
            fig = Figure(figsize=(width / 72.0, height / 72.0))
            fig.text(0, depth / height, expr, fontproperties=prop)
            buf = io.BytesIO()
            fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None},
                        transparent=True)
    except Exception as exc:  # mathtext knows a subset of TeX: show the source instead
        log.info("math %r not rendered (%s); shown as TeX", tex, exc)
        out = f"<code>{html.escape(expr)}</code>"
    else:
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        style = ("display:block;margin:0.6em auto" if display
                 else f"vertical-align:{-depth:.1f}px")
        out = (f'<img class="lc-math" alt="{html.escape(expr, quote=True)}" '
               f'width="{width:.1f}" height="{height:.1f}" style="{style}" '
               f'src="data:image/svg+xml;base64,{data}">')
    if cache is not None:
        cache[key] = out
    return out


def render_math(markdown: str, cache: dict | None = None) -> str:
    """Replace ``$$...$$`` and ``$...$`` outside code by inline SVG images (:func:`_svg_math`)."""
    parts = _FENCE.split(markdown)
    rendered: list[str] = []

    def hold(html_text):  # a placeholder, so that no later pattern looks inside the image
        rendered.append(html_text)
        return f"\x00{len(rendered) - 1}\x00"

    for i in range(0, len(parts), 2):  # even parts are outside code
        text = _DISPLAY.sub(lambda m: hold(_svg_math(m.group(1), display=True, cache=cache)),
                            parts[i])
        parts[i] = _INLINE.sub(lambda m: hold(_svg_math(m.group(1), cache=cache)), text)
    return re.sub("\x00(\\d+)\x00", lambda m: rendered[int(m.group(1))], "".join(parts))


# ----------------------------------------------------------------------------- pages
def _prepare(nb, math_cache):
    """Make an executed notebook static: finished progress bars, widget views and figure-caption
    outputs removed (the template captions the figures), math rendered. Returns the names of
    the figures it shows, in order."""
    from .nbtools import WIDGET_VIEW, tidy_executed

    tidy_executed(nb)
    nb.metadata.pop("widgets", None)
    figures = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = render_math(cell.source, math_cache)
            continue
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            meta = out.get("metadata", {}).get("lamostcannon", {})
            if meta.get("caption_for"):
                continue
            data = out.get("data")
            if data is not None and WIDGET_VIEW in data:
                data.pop(WIDGET_VIEW)
                if not data:
                    continue
            if meta.get("figure"):
                figures.append(meta["figure"])
            kept.append(out)
        cell.outputs = kept
    return figures


def _caption(name: str) -> str:
    from .nbtools import shown_path
    from .plotting.figure_map import paper_figure_text

    paper = paper_figure_text(name)
    head = f"<b>{html.escape(paper[0].upper() + paper[1:])}</b> · " if paper else ""
    return f"{head}<code>{html.escape(shown_path(paths.figures_dir() / (name + '.png')))}</code>"


def _nav(names, i, *, titles):
    links = ['<a href="index.html">index</a>', '<a href="index.html#claims">claims table</a>']
    if i > 0:
        links.append(f'<a href="{names[i - 1]}.html">&larr; {html.escape(titles[names[i - 1]])}</a>')
    if i + 1 < len(names):
        links.append(f'<a href="{names[i + 1]}.html">{html.escape(titles[names[i + 1]])} &rarr;</a>')
    return " ".join(links)


def _title(nb, name):
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return re.sub(r"[*`$]", "", line[2:]).strip()
    return name


# ----------------------------------------------------------------------------- index
def _readme_table(readme_text: str, heading: str) -> str:
    """The first Markdown table under ``## <heading>`` of the README."""
    m = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", readme_text, re.M | re.S)
    if not m:
        return ""
    lines, started = [], False
    for line in m.group(1).splitlines():
        if line.startswith("|"):
            lines.append(line)
            started = True
        elif started:
            break
    return "\n".join(lines) + "\n"


def _link_codes(html_text: str, pages: dict, figures: dict) -> str:
    """Turn ``<code>01_name</code>`` into links to pages and ``<code>name.png</code>`` into links
    to the figure's anchor; names with no page are marked."""
    def repl(m):
        code = m.group(1)
        stem = code.removesuffix(".ipynb")
        if stem in pages:
            return f'<a href="{stem}.html"><code>{code}</code></a>'
        if re.fullmatch(r"\d\d_[a-z0-9_]+", stem):
            return f'<code class="missing" title="not executed in this build">{code}</code>'
        if code.endswith(".png"):
            fig = code[:-4]
            if fig in figures:
                return f'<a href="{figures[fig]}"><code>{code}</code></a>'
            return f'<code class="missing" title="not shown by an executed notebook">{code}</code>'
        return m.group(0)

    return re.sub(r"<code>([^<]+)</code>", repl, html_text)


def _claims_html(table, pages) -> str:
    if table is None or not len(table):
        return "<p>No claims recorded (run <code>make reproduce</code>).</p>"
    from .claims import summary

    head = ["notebook", "claim", "paper", "source", "this run", "data", "verdict", "why"]
    rows = []
    for r in table.to_dict("records"):
        nb = r["notebook"]
        nb_cell = f'<a href="{nb}.html">{nb}</a>' if nb in pages else html.escape(nb)
        unit = f" {r['unit']}" if r["unit"] else ""
        paper = r["paper"] + (unit if r["paper"][-1:].isdigit() else "")
        ours = (r["ours"] + unit) if r["ours"] else ""
        what = r["what"] + (f" ({r['item']})" if r["item"] else "")
        cls = "v-" + r["verdict"].replace(" ", "-")
        cells = [nb_cell, html.escape(what), html.escape(paper), html.escape(r["source"]),
                 html.escape(ours), html.escape(r["data"]), html.escape(r["verdict"]),
                 html.escape(r["reason"])]
        rows.append(f'<tr class="{cls}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (f"<p>{html.escape(summary(table))}. Generated from the notebooks' records "
            "(<code>lamostcannon.claims</code>); the paper's side is typed once in the package, "
            "the verdict is computed. Also as <a href=\"claims.csv\">claims.csv</a>.</p>"
            "<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _paper_figure_list(figures) -> str:
    from .plotting.figure_map import FIGURES, NOT_DRAWN, PAPER_TITLES

    items = []
    for num, title in PAPER_TITLES.items():
        links = [f'<a href="{figures[f.name]}"><code>{f.name}</code></a>'
                 for f in FIGURES if num in f.paper and f.name in figures]
        if num in NOT_DRAWN:
            body = html.escape(NOT_DRAWN[num].replace("`", ""))
        else:
            body = ", ".join(links) or '<span class="missing">not in this build</span>'
        items.append(f"<li><b>Fig. {num}</b> ({html.escape(title)}): {body}</li>")
    return "<ul>" + "".join(items) + "</ul>"


def _write(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def build_site(notebooks_dir=None, out_dir=None, *, claims_dir=None, readme=None,
               source_notebooks=None) -> SiteReport:
    """Build the static site from executed notebooks (nothing is executed; nothing is fetched).

    Parameters
    ----------
    notebooks_dir : path, optional
        Executed notebooks, default ``build/notebooks`` (written by ``make reproduce``).
    out_dir : path, optional
        Default ``build/site``.
    claims_dir : path, optional
        The notebooks' claims files, default ``build/claims`` (:func:`lamostcannon.claims.gather`).
    readme : path, optional
        The README whose notebook and figure maps make the index; default the repository's.
    source_notebooks : path, optional
        Folder of the repository's notebooks (default ``notebooks/``); those without an executed
        copy are named in the index as not executed.

    Returns
    -------
    SiteReport

    Raises
    ------
    FileNotFoundError
        When ``notebooks_dir`` holds no executed notebook.
    """
    import nbconvert
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import ExtractOutputPreprocessor

    from . import claims as claims_mod

    notebooks_dir = Path(notebooks_dir) if notebooks_dir else paths.ROOT / "build" / "notebooks"
    out_dir = Path(out_dir) if out_dir else paths.ROOT / "build" / "site"
    readme = Path(readme) if readme else paths.ROOT / "README.md"
    source_notebooks = Path(source_notebooks) if source_notebooks else paths.ROOT / "notebooks"
    files = sorted(notebooks_dir.glob("[0-9][0-9]_*.ipynb"))
    if not files:
        raise FileNotFoundError(f"no executed notebooks in {notebooks_dir}: run `make reproduce` "
                                "(or `python -m lamostcannon reproduce`) first")
    out_dir.mkdir(parents=True, exist_ok=True)

    nbs = {p.stem: nbformat.read(p, as_version=4) for p in files}
    names = list(nbs)
    titles = {n: _title(nb, n) for n, nb in nbs.items()}
    report = SiteReport(out_dir=out_dir, index=out_dir / "index.html", titles=titles)
    math_cache: dict = {}
    exporter = HTMLExporter(template_name="lamostcannon", extra_template_basedirs=[str(TEMPLATE_DIR)])
    exporter.register_preprocessor(ExtractOutputPreprocessor(), enabled=True)
    for i, name in enumerate(names):
        nb = nbs[name]
        shown = _prepare(nb, math_cache)
        resources = {
            "output_files_dir": f"{name}_files",
            "unique_key": name,
            "metadata": {"name": titles[name]},
            "site": {"css": _CSS, "nav": _nav(names, i, titles=titles),
                     "captions": {f: _caption(f) for f in shown},
                     "footer": (f"The executed copy <code>build/notebooks/{name}.ipynb</code> of "
                                f"<code>notebooks/{name}.ipynb</code>, rendered by nbconvert "
                                f"{nbconvert.__version__} with the lamostcannon template; nothing "
                                "was executed again.")},
        }
        body, res = exporter.from_notebook_node(nb, resources=resources)
        for rel, data in res.get("outputs", {}).items():
            target = out_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        page = out_dir / f"{name}.html"
        _write(page, body)
        report.pages[name] = page
        for f in shown:
            report.figures.setdefault(f, f"{name}.html#fig-{f}")
        log.info("site page %s: %d figures", page.name, len(shown))

    report.not_executed = [p.stem for p in sorted(source_notebooks.glob("[0-9][0-9]_*.ipynb"))
                           if p.stem not in nbs]
    table = claims_mod.gather(claims_dir)
    table[list(claims_mod.COLUMNS)].to_csv(out_dir / "claims.csv", index=False)
    _write(report.index, _index_html(readme, report, table))
    return report


def _index_html(readme: Path, report: SiteReport, table) -> str:
    import mistune

    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    md = mistune.create_markdown(plugins=["table"])
    nb_table = _link_codes(md(_readme_table(text, "Notebooks")), report.pages, report.figures)
    fig_table = _link_codes(md(_readme_table(text, "Figures")), report.pages, report.figures)
    missing = ""
    if report.not_executed:
        missing = ("<p class=\"missing\">Not executed in this build: "
                   + ", ".join(f"<code>{html.escape(n)}</code>" for n in report.not_executed)
                   + " (see the notebook map for what each needs).</p>")
    pages = "".join(f'<li><a href="{n}.html">{html.escape(n)}</a>: {html.escape(report.titles[n])}'
                    "</li>" for n in report.pages)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>lamostcannon: the executed notebooks</title>
<style>{_INDEX_CSS}</style></head>
<body>
<h1>lamostcannon: the notebooks, executed</h1>
<p>Companion code for Wheeler et al. 2020, <i>Abundances in the Milky Way across five
nucleosynthetic channels from 4 million LAMOST stars</i> (ApJ 898, 58). Each page below is a
notebook as <code>make reproduce</code> executed it, with its figures and outputs; every figure is
captioned with the paper figure it reproduces. Built by <code>make site</code> without executing
anything again.</p>
<nav class="toc"><a href="#notebooks">notebooks</a><a href="#figures">figures</a>
<a href="#paper-figures">by paper figure</a><a href="#claims">claims table</a></nav>
<h2 id="notebooks">Notebooks</h2>
<ul>{pages}</ul>
{nb_table}
{missing}
<h2 id="figures">Figures</h2>
{fig_table}
<h2 id="paper-figures">By paper figure</h2>
{_paper_figure_list(report.figures)}
<h2 id="claims">The paper's numbers beside this run's</h2>
{_claims_html(table, report.pages)}
</body></html>
"""
