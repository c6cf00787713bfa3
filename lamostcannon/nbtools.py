"""Notebook hygiene: names without machine paths, and executed copies that read well as static
pages.

:func:`shown_path` turns a path into what a notebook should print (``data/processed/x.fits``,
``../shared/data/lamost/dr10``), never ``/home/...``. :func:`tidy_executed` is applied by
``python -m lamostcannon reproduce`` to every executed copy in ``build/notebooks/``: progress bars
(``tqdm.auto`` widgets) get their *finished* state as text, and carriage-return progress lines in
streams collapse to their last state, so a static copy shows "100%" rather than "0%" or a
thousand lines of updates.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

from . import paths

#: Mime type of a Jupyter widget view in a notebook output.
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
#: Key of the saved widget state in the notebook metadata (written by nbclient).
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"

_CR = re.compile(r"[^\n]*\r(?=[^\n])")


def shown_path(path) -> str:
    """A path as a notebook should show it: relative to the repository (``figures/x.png``), to
    the data root (``data/...``, also when ``LAMOSTCANNON_DATA`` moves it) or, for a folder beside
    the repository, ``../shared/...``; anything else by its last two parts (``.../dr10/x.fits``).

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    str, with ``/`` separators, never an absolute path.
    """
    p = Path(path).expanduser()
    if not p.is_absolute():
        return p.as_posix()
    p = Path(os.path.abspath(p))
    for base, prefix in ((paths.data_dir(), "data"), (paths.figures_dir(), "figures"),
                         (paths.ROOT, ""), (paths.ROOT.parent, "..")):
        try:
            rel = p.relative_to(Path(os.path.abspath(base)))
        except ValueError:
            continue
        return "/".join(part for part in (prefix, rel.as_posix()) if part and part != ".") or "."
    return ".../" + "/".join(p.parts[-2:])


def widget_text(state: dict, model_id: str) -> str | None:
    """Plain text of a finished ``tqdm`` notebook bar (an HBox of HTML, FloatProgress, HTML) from
    the saved widget state, e.g. ``"ingest: 100%|##########| 5/5 [00:00<00:00, 19.4file/s]"``.

    Returns None when ``model_id`` is not such a bar.
    """
    box = state.get(model_id)
    if not box or box.get("model_name") != "HBoxModel":
        return None
    children = [c.removeprefix("IPY_MODEL_") for c in box.get("state", {}).get("children", [])]
    parts = [state.get(c, {}) for c in children]
    kinds = [p.get("model_name") for p in parts]
    if len(parts) != 3 or kinds[1] not in ("FloatProgressModel", "IntProgressModel"):
        return None

    def _html(part):
        text = html.unescape(str(part.get("state", {}).get("value", "")))
        return re.sub(r"<[^>]+>", "", text).replace("\u2007", " ").strip()

    prog = parts[1].get("state", {})
    value, vmax = float(prog.get("value") or 0.0), prog.get("max")
    width = 10
    filled = int(round(width * value / float(vmax))) if vmax else 0
    bar = "#" * min(filled, width) + " " * (width - min(filled, width))
    left, right = _html(parts[0]), _html(parts[2])
    status = {"danger": " (stopped)"}.get(prog.get("bar_style") or "", "")
    return f"{left}|{bar}| {right}{status}".strip()


def finish_progress_widgets(nb) -> int:
    """Give every progress-bar widget output of an executed notebook its final state as text.

    ``tqdm.auto`` shows a widget in a notebook; its plain-text fallback is the bar at the moment it
    was created (0%). The final values are in the widget state nbclient saves in the notebook
    metadata; this writes them into the output's ``text/plain`` and ``text/html``, so that any
    static view (nbconvert HTML, a renderer without widget support) shows the finished bar. The
    widget view itself is kept for frontends that render widgets.

    Returns the number of outputs changed.
    """
    state = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    changed = 0
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            view = out.get("data", {}).get(WIDGET_VIEW)
            if not view:
                continue
            text = widget_text(state, view.get("model_id", ""))
            if text is None:
                continue
            out["data"]["text/plain"] = text
            out["data"]["text/html"] = f"<pre class=\"progress\">{html.escape(text)}</pre>"
            changed += 1
    return changed


def collapse_carriage_returns(nb) -> int:
    """Merge consecutive stream outputs of one kind and keep only the last state of each line
    rewritten with ``\\r`` (text progress bars). Returns the number of outputs changed."""
    changed = 0
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        merged = []
        for out in cell.get("outputs", []):
            if (out.get("output_type") == "stream" and merged
                    and merged[-1].get("output_type") == "stream"
                    and merged[-1].get("name") == out.get("name")):
                merged[-1]["text"] = _text(merged[-1]) + _text(out)
                changed += 1
                continue
            merged.append(out)
        for out in merged:
            if out.get("output_type") == "stream" and "\r" in _text(out):
                out["text"] = _CR.sub("", _text(out)).replace("\r\n", "\n").rstrip("\r")
                changed += 1
        cell["outputs"] = merged
    return changed


def _text(out) -> str:
    text = out.get("text", "")
    return "".join(text) if isinstance(text, list) else text


def tidy_executed(nb):
    """Both of the above, in place; returns ``nb``."""
    finish_progress_widgets(nb)
    collapse_carriage_returns(nb)
    return nb


def compact_table(table, *, digits: int = 3, max_columns: int | None = None):
    """A table as a notebook should show it: columns that are entirely missing (NaN, None or
    empty strings) dropped, floats rounded to ``digits``, and at most ``max_columns`` columns
    (the first ones) so that a wide, mostly-NaN table does not fill the page.

    Parameters
    ----------
    table : pandas.DataFrame or astropy Table (converted with ``to_pandas``)

    Returns
    -------
    pandas.DataFrame (a copy)
    """
    import pandas as pd

    df = table.to_pandas() if hasattr(table, "to_pandas") else pd.DataFrame(table).copy()
    textual = (pd.api.types.is_object_dtype, pd.api.types.is_string_dtype)
    empty = [c for c in df.columns
             if df[c].isna().all()
             or (any(t(df[c]) for t in textual) and not df[c].fillna("").astype(bool).any())]
    df = df.drop(columns=empty)
    if max_columns is not None and df.shape[1] > max_columns:
        df = df.iloc[:, :max_columns]
    return df.round(digits)
