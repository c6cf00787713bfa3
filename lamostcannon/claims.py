"""The paper's numbers beside this run's: a claims table for readers who check the paper.

Each notebook records the figures it computes that correspond to a number Wheeler et al. (2020)
state (reference-set size and cuts, CV scatter per label, precision over the unbiased range,
catalogue counts, wide-binary and field peaks, the Praesepe dispersion, gradients and halo
trends). The paper's side is typed once, here, in :data:`PAPER_CLAIMS` (value or range, unit,
tolerance and the section or figure it comes from); the notebook gives only this run's value and,
where the two differ, its reason. The verdict is computed, never typed (:func:`verdict`).

In a notebook::

    from lamostcannon import claims
    rec = claims.Recorder("02_cleaning")
    rec.record("reference_stars", n_reference)
    rec.record("giant_fraction", frac, reason="the mock's GALAH selection favours giants")

Each :meth:`Recorder.record` rewrites ``build/claims/<notebook>.json`` atomically (a temporary
file renamed into place). ``python -m lamostcannon reproduce`` then gathers every notebook's file
(:func:`gather`) into ``build/claims.md``, ``build/claims.csv`` and ``build/claims.json``
(:func:`write_table`), which the static site shows; ``python -m lamostcannon claims --readme``
writes the same table into the README.

Verdicts
--------
``agrees``
    within the paper's range, within the tolerance of its value, or of the paper's sign.
``differs``
    outside them; the reason says by how much, then the notebook's reason (or "no reason given").
``not comparable``
    a count that scales with the survey, measured on the mock (whose size is not the survey's).
``inconclusive``
    a sign or trend claim whose value is within two standard errors of zero (or has none).
``reported``
    the paper gives no number; this run's value is listed for completeness.
``not recorded``
    (in the gathered table only) no notebook recorded the claim in this run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from . import paths

log = logging.getLogger(__name__)

#: Kinds of claim (:attr:`PaperClaim.kind`).
KINDS = ("value", "range", "count", "sign", "nonzero", "reported")

#: Columns of the gathered table, in order.
COLUMNS = ("notebook", "key", "item", "what", "paper", "source", "ours", "unit", "data",
           "verdict", "reason")


@dataclass(frozen=True)
class PaperClaim:
    """One number the paper states.

    Attributes
    ----------
    key : identifier used by :meth:`Recorder.record`
    what : what the number is, in a few words
    source : where the paper states it (section, figure, table, equation)
    kind : ``"value"`` (``value`` +- ``tolerance``), ``"range"`` (``low``-``high``), ``"count"``
        (a number of stars or observations, which scales with the survey: compared only on real
        data, within the relative ``tolerance``), ``"sign"`` (``value`` is -1, 0 or +1: the sign
        the paper finds; 0 means "no trend"), ``"nonzero"`` (a trend the paper shows without
        giving its sign) or ``"reported"`` (no number in the paper)
    value, low, high : the paper's number or range
    tolerance : absolute for ``"value"``, relative for ``"count"``; chosen from how the paper
        words the number (a round "about half" gets more room than a quoted count)
    unit : unit of the value (``"dex"``, ``"K"``, ``""`` for counts and fractions)
    paper_text : how the paper's side is shown (default: formatted from the numbers)
    """

    key: str
    what: str
    source: str
    kind: str
    value: float | None = None
    low: float | None = None
    high: float | None = None
    tolerance: float | None = None
    unit: str = ""
    paper_text: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"claim {self.key!r}: kind must be one of {KINDS}, got {self.kind!r}")
        need = {"value": ("value", "tolerance"), "range": ("low", "high"),
                "count": ("value", "tolerance"), "sign": ("value",), "nonzero": (),
                "reported": ()}[self.kind]
        missing = [n for n in need if getattr(self, n) is None]
        if missing:
            raise ValueError(f"claim {self.key!r} of kind {self.kind!r} needs {missing}")
        if self.kind == "sign" and self.value not in (-1, 0, 1):
            raise ValueError(f"claim {self.key!r}: a sign claim's value is -1, 0 or +1")
        if self.kind == "range" and not self.low <= self.high:
            raise ValueError(f"claim {self.key!r}: low {self.low} > high {self.high}")

    def paper(self) -> str:
        """The paper's side as text."""
        if self.paper_text:
            return self.paper_text
        if self.kind == "range":
            return f"{_num(self.low)}-{_num(self.high)}"
        if self.kind == "sign":
            return {-1: "< 0", 0: "no trend", 1: "> 0"}[int(self.value)]
        if self.kind == "reported":
            return "(no number)"
        if self.kind == "nonzero":
            return "a trend"
        if self.kind == "count":
            return f"{self.value:,.0f}"
        return _num(self.value)


def _C(*args, **kw):
    c = PaperClaim(*args, **kw)
    return c.key, c


#: Every number of the paper that a notebook can check, typed once (Wheeler et al. 2020, ApJ
#: 898, 58; /shared/PAPER.md and the paper text). Tolerances follow the paper's wording.
PAPER_CLAIMS: dict[str, PaperClaim] = dict([
    # ---- section 2: the reference set (notebook 02)
    _C("crossmatch_candidates", "GALAH x LAMOST stars within 1 arcsec", "sec. 2.1", "count",
       10_000, tolerance=0.2, paper_text="roughly 10,000"),
    _C("quality_cuts_fraction_removed", "fraction removed by S/N < 30, chi2_cannon > 4, "
       "flag_cannon", "sec. 2.1", "value", 0.5, tolerance=0.1, paper_text="roughly half"),
    _C("window_chi2_fraction_removed", "fraction of the rest removed by the 85th-percentile "
       "windowed chi2 rule", "sec. 2.1 (derived: ~5,000 -> 1,722)", "value", 1 - 1722 / 5000,
       tolerance=0.1, paper_text="~0.66"),
    _C("reference_stars", "reference stars after all cuts", "sec. 2.1, Fig. 3", "count", 1722,
       tolerance=0.05),
    _C("reference_dwarfs", "dwarfs in the reference set (eq. 1)", "sec. 2.2", "count", 1190,
       tolerance=0.05),
    _C("reference_giants", "giants in the reference set (eq. 1)", "sec. 2.2", "count", 532,
       tolerance=0.05),
    _C("giant_fraction", "giant fraction of the reference set", "sec. 2.2 (532 / 1722)", "value",
       532 / 1722, tolerance=0.05),
    # ---- section 2.2 / 3: the models (notebook 03)
    _C("dwarf_abundance_labels", "abundance labels of the dwarf model", "abstract, sec. 2.2",
       "value", 5, tolerance=0),
    _C("giant_abundance_labels", "abundance labels of the giant model", "abstract, sec. 2.2",
       "value", 6, tolerance=0),
    _C("dwarf_model_labels", "labels of the dwarf model (with teff, logg, vmic, [Fe/H])",
       "sec. 2.2", "value", 9, tolerance=0),
    _C("giant_model_labels", "labels of the giant model (with teff, logg, vmic, [Fe/H])",
       "sec. 2.2", "value", 10, tolerance=0),
    # ---- section 4: cross-validation (notebook 04)
    _C("cv_scatter_dwarf_abundances", "12-fold CV scatter of each dwarf abundance",
       "sec. 4, Fig. 5", "range", low=0.05, high=0.23, unit="dex"),
    _C("cv_scatter_giant_abundances", "12-fold CV scatter of each giant abundance",
       "sec. 4, Fig. 6", "range", low=0.07, high=0.22, unit="dex"),
    _C("cv_scatter_dwarf_alpha", "CV scatter of the dwarf [alpha/Fe]", "appendix B", "value",
       0.06, tolerance=0.01, unit="dex"),
    _C("giant_feh_unbiased_down_to", "lower KDE boundary of the giant [Fe/H] (unbiased down to)",
       "Fig. 6 caption", "value", -1.5, tolerance=0.25, unit="dex", paper_text="about -1.5"),
    _C("precision_relative_to_unbiased_range", "2 x CV scatter / unbiased range of each abundance",
       "sec. 4, Fig. 7", "range", low=0.3, high=0.5, paper_text="generally 0.3-0.5"),
    _C("cv_flagged_fraction", "CV-labelled reference stars beyond a KDE boundary", "sec. 4",
       "reported"),
    _C("repeat_over_cv_precision", "repeat-visit scatter / (sqrt 2 x CV scatter)",
       "sec. 4 (\"consistent with CV precision\")", "value", 1.0, tolerance=0.3,
       paper_text="consistent (~1)"),
    # ---- section 5.1: the catalogue (notebook 05)
    _C("catalog_observations", "observations labelled", "sec. 5.1", "count", 4_541_883,
       tolerance=0.01),
    _C("catalog_stars", "stars after combining repeats", "sec. 5.1", "count", 3_744_284,
       tolerance=0.01),
    _C("observations_per_star", "observations per star", "sec. 5.1 (4,541,883 / 3,744,284)",
       "value", 4_541_883 / 3_744_284, tolerance=0.05),
    _C("catalog_giant_fraction", "fraction of the catalogue labelled as giants",
       "sec. 6 (8.8e5 of 2.9e6 + 8.8e5)", "value", 8.8e5 / (2.9e6 + 8.8e5), tolerance=0.05),
    _C("catalog_flagged_fraction", "stars flagged as extrapolating in teff, logg or [Fe/H]",
       "sec. 5.1, Table 1", "reported"),
    # ---- section 5.2 and appendix B: wide binaries and Praesepe (notebook 06)
    _C("binary_distance_peak", "peak of the wide binaries' chemical distance (eq. 6)",
       "sec. 5.2, Fig. 9", "value", 0.8, tolerance=0.15),
    _C("field_distance_peak", "peak of the matched field pairs' chemical distance (eq. 6)",
       "sec. 5.2, Fig. 9", "value", 2.5, tolerance=0.3),
    _C("field_over_binary_peak", "field peak / binary peak", "sec. 5.2 (2.5 / 0.8)", "value",
       2.5 / 0.8, tolerance=0.6),
    _C("separation_grows_with_elements", "field - binary median distance, last element added "
       "minus first", "sec. 5.2 (\"each abundance pushes ... further apart\")", "sign", 1),
    _C("separation_vs_chemical_distance", "Spearman correlation of binary separation and "
       "chemical distance", "sec. 5.2 (no trend found)", "sign", 0),
    _C("praesepe_alpha_dispersion", "[alpha/Fe] dispersion of Praesepe dwarfs", "appendix B, "
       "Fig. 17", "value", 0.07, tolerance=0.01, unit="dex"),
    _C("praesepe_dispersion_over_cv", "Praesepe [alpha/Fe] dispersion / dwarf CV scatter",
       "appendix B (0.07 / 0.06)", "value", 0.07 / 0.06, tolerance=0.2),
    _C("praesepe_alpha_teff_slope", "[alpha/Fe] trend with teff among Praesepe dwarfs",
       "appendix B, Fig. 17 (a spurious trend)", "nonzero", unit="dex per 1000 K"),
    # ---- section 5.3: maps (notebook 07)
    _C("giants_in_maps", "giants in the (R, z) maps", "sec. 5.3, Fig. 10", "count", 800_000,
       tolerance=0.1, paper_text="nearly 800,000"),
    _C("feh_vertical_gradient", "d[Fe/H]/d|z| at the solar radius", "sec. 5.3, Fig. 10 "
       "(metal-poor halo away from the plane)", "sign", -1, unit="dex/kpc"),
    _C("halo_transition_height", "|z| of the disk-halo transition at R = 8 kpc",
       "sec. 5.3, Fig. 10", "value", 2.0, tolerance=0.5, unit="kpc", paper_text="about 2"),
    _C("alfe_peak_height", "|z| where the mean [Al/Fe] peaks at fixed R", "sec. 5.3, Fig. 10",
       "value", 2.0, tolerance=0.5, unit="kpc", paper_text="about 2"),
    # ---- section 5.4: the halo transition (notebook 08)
    _C("halo_vphi_outer", "median v_phi of halo stars at 11 < R < 13 kpc", "sec. 5.4",
       "value", 80.0, tolerance=70.0, unit="km/s", paper_text="80 +- 70"),
    _C("halo_feh_drop_with_height", "mean [Fe/H] above (2 < |z| < 4 kpc) minus near the plane",
       "sec. 5.4, Figs 13-14", "sign", -1, unit="dex"),
    _C("halo_jr_rise_with_height", "median J_R above (2 < |z| < 4 kpc) minus near the plane",
       "sec. 5.4, Fig. 13", "sign", 1, unit="kpc km/s"),
    _C("halo_vphi_drop_with_height", "median v_phi above (2 < |z| < 4 kpc) minus near the plane",
       "sec. 5.4, Fig. 14", "sign", -1, unit="km/s"),
])


def _num(x) -> str:
    """Compact number: integers with separators, others with 3 significant digits."""
    if x is None:
        return ""
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == int(x) and abs(x) >= 1:
        return f"{int(x):,}"
    return f"{x:.3g}"


def _with_unit(x, unit) -> str:
    return f"{_num(x)} {unit}".strip()


def verdict(claim: PaperClaim, value, *, err=None, data: str = "mock",
            reason: str | None = None) -> tuple[str, str]:
    """The verdict and its one-line reason for this run's ``value`` of ``claim``.

    Parameters
    ----------
    claim : PaperClaim
    value : float
        This run's number.
    err : float, optional
        Its standard error (used by sign claims).
    data : {"mock", "real"}
        What the number was measured on; counts are compared only on real data.
    reason : str, optional
        The notebook's explanation, appended where the numbers differ.

    Returns
    -------
    (verdict, reason) : two strings (see the module docstring).
    """
    why = f"; notebook: {reason}" if reason else "; no reason given"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "differs", f"value {value!r} is not a number{why}"
    if not math.isfinite(v):
        return "differs", f"value is {v}{why}"
    u = claim.unit
    if claim.kind == "reported":
        return "reported", "the paper gives no number" + (f"; notebook: {reason}" if reason else "")
    if claim.kind == "range":
        if claim.low <= v <= claim.high:
            return "agrees", f"within the paper's {claim.paper()}"
        side, d = (("below", claim.low - v) if v < claim.low else ("above", v - claim.high))
        return "differs", f"{_with_unit(d, u)} {side} the paper's {claim.paper()}{why}"
    if claim.kind == "count":
        ratio = v / claim.value
        if data != "real":
            return "not comparable", (f"a count on the {data} data ({ratio:.3g} x the paper's "
                                      f"{claim.paper()}), whose size is not the survey's; "
                                      "compare the fractions")
        if abs(ratio - 1.0) <= claim.tolerance:
            return "agrees", f"within {claim.tolerance:.0%} of {claim.paper()}"
        return "differs", f"{ratio:.3g} x the paper's {claim.paper()}{why}"
    if claim.kind in ("sign", "nonzero"):
        want = 2 if claim.kind == "nonzero" else int(claim.value)
        sig = abs(v) / err if err is not None and err > 0 else None
        sig_text = f" ({_with_unit(v, u)}, {sig:.1f} sigma)" if sig is not None else \
            f" ({_with_unit(v, u)})"
        if want == 0:
            if sig is None:
                return "inconclusive", f"no standard error to test 'no trend'{sig_text}"
            if sig < 2:
                return "agrees", f"consistent with no trend{sig_text}"
            return "differs", f"a trend at {sig:.1f} sigma{why}"
        if sig is not None and sig < 2:
            return "inconclusive", f"within 2 sigma of zero{sig_text}"
        if want == 2:
            if sig is None:
                return "inconclusive", f"no standard error to test for a trend{sig_text}"
            return "agrees", f"a trend, as in the paper{sig_text}"
        if (v > 0) == (want > 0) and v != 0:
            return "agrees", f"{'positive' if want > 0 else 'negative'}, as in the paper{sig_text}"
        return "differs", f"the opposite sign of the paper's{sig_text}{why}"
    # value
    d = v - claim.value
    if abs(d) <= claim.tolerance + 1e-12 * max(1.0, abs(claim.value)):
        if claim.tolerance == 0:
            return "agrees", "as in the paper"
        return "agrees", f"within {_with_unit(claim.tolerance, u)} of the paper's {claim.paper()}"
    rel = f", {d / claim.value:+.0%}" if claim.value else ""
    sign = "+" if d > 0 else "-"
    return "differs", (f"differs by {sign}{_with_unit(abs(d), u)}{rel} from the paper's "
                       f"{claim.paper()}{why}")


class Verdict(NamedTuple):
    """What :meth:`Recorder.record` returns: the verdict and its reason, shown in a notebook as
    one line (``giant_fraction = 0.556; paper 0.309: differs (...)``)."""

    verdict: str
    reason: str
    key: str = ""
    value: float | None = None
    paper: str = ""

    def __repr__(self) -> str:
        return f"{self.key} = {_num(self.value)}; paper {self.paper}: {self.verdict} ({self.reason})"

    def _repr_pretty_(self, p, cycle):
        p.text(repr(self))


def claims_dir() -> Path:
    """``build/claims/`` of the repository, where each notebook writes its file."""
    return paths.ROOT / "build" / "claims"


_NAME = re.compile(r"^\d\d_[a-z0-9_]+$")


class Recorder:
    """Records one notebook's claims in ``<directory>/<notebook>.json``.

    Creating a recorder starts the notebook's file afresh (a rerun never mixes with an earlier
    run); every :meth:`record` rewrites it atomically.

    Parameters
    ----------
    notebook : str
        The notebook's name without extension, e.g. ``"02_cleaning"``.
    data : {"mock", "real"}, optional
        What the numbers are measured on; default from ``LAMOSTCANNON_SOURCE`` (``mock`` or, for
        ``archive``, ``real``). Notebook 09, which reads real LAMOST spectra, passes ``"real"``.
    directory : path, optional
        Default :func:`claims_dir`.
    """

    def __init__(self, notebook: str, *, data: str | None = None, directory=None):
        if not _NAME.match(str(notebook)):
            raise ValueError(f"notebook must be a name like '02_cleaning', got {notebook!r}")
        from .config import settings

        s = settings()
        if data is None:
            data = "mock" if s.source == "mock" else "real"
        if data not in ("mock", "real"):
            raise ValueError(f"data must be 'mock' or 'real', got {data!r}")
        self.notebook = str(notebook)
        self.data = data
        self.run = {"source": s.source, "size": s.size, "seed": s.seed}
        self.directory = Path(directory) if directory is not None else claims_dir()
        self.records: list[dict] = []
        self._write()

    @property
    def path(self) -> Path:
        return self.directory / f"{self.notebook}.json"

    def record(self, key: str, value, *, item: str | None = None, err=None,
               reason: str | None = None, data: str | None = None) -> tuple[str, str]:
        """Record this run's ``value`` of the paper's claim ``key``.

        Parameters
        ----------
        key : a key of :data:`PAPER_CLAIMS`
        value : float (numpy scalars are fine)
        item : str, optional
            Which member of a per-label claim this is (e.g. ``"o_fe"`` for
            ``cv_scatter_dwarf_abundances``); one row per item.
        err : float, optional
            Standard error of ``value`` (sign claims need it to say "no trend").
        reason : str, optional
            Why this run differs from the paper, where it does (one sentence).
        data : {"mock", "real"}, optional
            Overrides the recorder's ``data`` for this row.

        Returns
        -------
        Verdict
            ``(verdict, reason, key, value, paper)``, as :func:`verdict` computes it (the file
            stores only the inputs; :func:`gather` computes the verdict again).
        """
        if key not in PAPER_CLAIMS:
            raise KeyError(f"{key!r} is not a paper claim; known: {sorted(PAPER_CLAIMS)}")
        data = data or self.data
        if data not in ("mock", "real"):
            raise ValueError(f"data must be 'mock' or 'real', got {data!r}")
        value = _plain(value)
        err = _plain(err)
        rec = {"key": key, "item": item or "", "value": value, "err": err,
               "reason": reason or "", "data": data}
        self.records = [r for r in self.records if (r["key"], r["item"]) != (key, rec["item"])]
        self.records.append(rec)
        self._write()
        v = verdict(PAPER_CLAIMS[key], value, err=err, data=data, reason=reason)
        label = f"{key}[{item}]" if item else key
        log.info("claim %s = %s: %s (%s)", label, value, *v)
        return Verdict(*v, key=label, value=value, paper=PAPER_CLAIMS[key].paper())

    def table(self):
        """This notebook's claims so far, as :func:`gather` shows them (a DataFrame with the
        paper's value, this run's, the verdict and its reason)."""
        table = gather(self.directory, include_unrecorded=False)
        table = table[table["notebook"] == self.notebook]
        table = table[["key", "item", "paper", "ours", "unit", "data", "verdict", "reason"]]
        empty = [c for c in ("item", "unit") if not table[c].astype(bool).any()]
        return table.drop(columns=empty).reset_index(drop=True)

    def _write(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = {"notebook": self.notebook, "data": self.data, "run": self.run,
                   "records": self.records}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.path)


def _plain(x):
    """A JSON-safe float (numpy scalars and 0-d arrays included), or None."""
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        raise TypeError(f"a claim's value must be a number, got {type(x).__name__}: {x!r}") \
            from None


def gather(directory=None, *, include_unrecorded: bool = True):
    """One table of every recorded claim, with the paper's side and the computed verdict.

    Parameters
    ----------
    directory : path, optional
        Where the notebooks' files are (default :func:`claims_dir`).
    include_unrecorded : bool
        Add a row ``not recorded`` for each paper claim no notebook recorded.

    Returns
    -------
    pandas.DataFrame with :data:`COLUMNS` plus ``value`` and ``err`` (floats), in notebook
    order, then in the order each notebook recorded its claims; unrecorded claims last, in
    :data:`PAPER_CLAIMS` order. Files that cannot be read are skipped with a warning.
    """
    import pandas as pd

    directory = Path(directory) if directory is not None else claims_dir()
    rows, seen = [], set()
    for path in sorted(directory.glob("[0-9][0-9]_*.json")):
        try:
            payload = json.loads(path.read_text())
            records = payload["records"]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("claims file %s skipped: %s", path, exc)
            continue
        for r in records:
            claim = PAPER_CLAIMS.get(r.get("key"))
            if claim is None:
                log.warning("%s: unknown claim %r skipped", path.name, r.get("key"))
                continue
            v, why = verdict(claim, r.get("value"), err=r.get("err"), data=r.get("data", "mock"),
                             reason=r.get("reason") or None)
            seen.add(claim.key)
            rows.append({"notebook": payload.get("notebook", path.stem), "key": claim.key,
                         "item": r.get("item", ""), "what": claim.what, "paper": claim.paper(),
                         "source": claim.source, "ours": _num(r.get("value")),
                         "unit": claim.unit, "data": r.get("data", "mock"), "verdict": v,
                         "reason": why, "value": r.get("value"), "err": r.get("err")})
    if include_unrecorded:
        for claim in PAPER_CLAIMS.values():
            if claim.key not in seen:
                rows.append({"notebook": "", "key": claim.key, "item": "", "what": claim.what,
                             "paper": claim.paper(), "source": claim.source, "ours": "",
                             "unit": claim.unit, "data": "", "verdict": "not recorded",
                             "reason": "no notebook recorded it in this run", "value": None,
                             "err": None})
    return pd.DataFrame(rows, columns=[*COLUMNS, "value", "err"])


def markdown(table) -> str:
    """The gathered table as a Markdown table (the columns a reader needs)."""
    cols = ["notebook", "claim", "paper", "source", "ours", "data", "verdict", "reason"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in table.to_dict("records"):
        claim = r["what"] + (f" ({r['item']})" if r["item"] else "")
        unit = f" {r['unit']}" if r["unit"] else ""
        cells = [r["notebook"], claim, r["paper"] + (unit if r["paper"][-1:].isdigit() else ""),
                 r["source"], (r["ours"] + unit) if r["ours"] else "", r["data"], r["verdict"],
                 r["reason"]]
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"


def summary(table) -> str:
    """One line: how many claims agree, differ, ... (e.g. ``"12 agree, 3 differ, 5 not comparable"``)."""
    counts = table["verdict"].value_counts()
    order = ["agrees", "differs", "not comparable", "inconclusive", "reported", "not recorded"]
    return ", ".join(f"{int(counts[v])} {v}" for v in order if v in counts)


def write_table(table, out_dir=None) -> dict[str, Path]:
    """Write ``claims.md``, ``claims.csv`` and ``claims.json`` (each atomically) to ``out_dir``
    (default ``build/``). Returns ``{"md": path, "csv": path, "json": path}``."""
    out_dir = Path(out_dir) if out_dir is not None else paths.ROOT / "build"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    texts = {
        "md": "# The paper's numbers beside this run's\n\n"
              "Generated by `python -m lamostcannon reproduce` from the notebooks' "
              "`build/claims/*.json` (`lamostcannon.claims`); " + summary(table) + ".\n\n"
              + markdown(table),
        "csv": table.to_csv(index=False),
        "json": json.dumps([{k: _json_safe(v) for k, v in r.items()}
                            for r in table.to_dict("records")], indent=1) + "\n",
    }
    for ext, text in texts.items():
        target = out_dir / f"claims.{ext}"
        tmp = target.with_name(f".claims.{ext}.{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(target)
        written[ext] = target
    return written


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


#: Markers of the generated claims table in the README.
README_BEGIN = "<!-- claims table: generated by `python -m lamostcannon claims --readme` -->"
README_END = "<!-- end of claims table -->"


def update_readme(table, readme=None) -> bool:
    """Replace the block between :data:`README_BEGIN` and :data:`README_END` of the README with
    the gathered table; returns True when the README changed."""
    readme = Path(readme) if readme is not None else paths.ROOT / "README.md"
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} has no claims block ({README_BEGIN!r} ... {README_END!r})")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_BEGIN}\n{summary(table)}.\n\n{markdown(table)}{README_END}{tail}"
    if new != text:
        readme.write_text(new)
        return True
    return False


def paper_side(claim_key: str) -> dict:
    """The paper's side of one claim as a dict (for tests and documentation)."""
    return asdict(PAPER_CLAIMS[claim_key])
