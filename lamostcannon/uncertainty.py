"""Calibrated label uncertainties: what ``e_<label>`` means, and how it is learned.

The test step's formal error ``e_formal`` (inverse Hessian of chi2/2) counts only the photon noise
and the model's pixel scatter ``s_lambda``, pixel by pixel. It is too small: neighbouring pixels of
resampled LAMOST spectra are correlated, calibration and continuum differ from visit to visit, and
the model itself is wrong by a star-dependent amount that no S/N removes. The error model, per
model and label, is

    e_random^2 = (scale * e_formal * g(snr))^2 + random_floor^2
    g(snr)     = (100 / clip(snr, snr_min, 100))^gamma
    e_total^2  = e_random^2 + floor^2 + (floor_scale * e_formal)^2

with ``scale >= 1`` (the photon noise the formal error counts is a lower bound of the random
error), ``0 <= gamma <= 1`` (below S/N 100, real spectra lose precision faster than the formal
error says; ``g >= 1``; below ``snr_min``, the lowest S/N of the calibration data, ``g`` stays
constant rather than extrapolate) and ``snr`` the package's S/N
(:func:`lamostcannon.ood.spectrum_snr`).

``e_random`` (column ``e_<label>_random``) is the visit-to-visit error: two observations of one
star differ by ``sqrt(e_random,1^2 + e_random,2^2)``. ``floor`` (and ``floor_scale * e_formal``,
a systematic that is larger for fainter, lower-S/N stars and that only repeat pairs can tell from
the random part) is shared by every observation of a star (model systematics at the star's
labels): it cancels in the difference of two visits and does not average down when repeats are
combined. ``e_<label>``, the column to
quote, is ``e_total``; ``e_<label>_formal`` is kept beside it.

What each data set constrains (:func:`fit_error_model`)
    *Repeat pairs* (independent visits of one star) see only the random part:
    ``l_1 - l_2 ~ N(0, e_random,1^2 + e_random,2^2)``.
    *Cross-validation residuals* against the reference labels see everything:
    ``l_CV - l_ref ~ N(0, e_random^2 + floor^2 + e_ref^2)``, ``e_ref`` being the reference label's
    own noise.
    Both are fitted together: the pairs pin the random part, the CV the rest. The pairs should
    span the S/N range the errors are used at: the reference sets' spectra have S/N above ~40,
    so notebook 04 adds the survey's own repeat pairs (half of its repeat-observed stars, down to
    S/N ~10; :func:`lamostcannon.trust.survey_repeat_pairs`). Without pairs the CV's S/N range
    separates the two (the random part grows towards low S/N, the floor does not) and
    ``random_floor = 0``.

The reference labels' own noise
    Quoted reference errors can be subtracted (``ref_errors``), but only where they are right:
    the mock's GALAH-like ``e_teff`` (median 106 K for the dwarfs) exceeds the actual scatter of
    those labels about the truth (90 K), so subtracting it would leave the model no error at all.
    The notebooks therefore do not subtract: the floor then also holds the reference labels' noise
    (LASP's on real spectra, GALAH's on the mock), ``e_<label>`` is the error against the
    reference scale and an upper bound of the error against the truth, and the calibration file
    says so (``floor_includes_reference_noise``). Against the mock's truth these errors are
    conservative (pull spreads below 1; notebook 04).

Fits match quantiles, not variances: the parameters are those for which 68.3% of the normalised
residuals lie within +-1 in each equal-count S/N bin. Catastrophic CV outliers, wrong reference
labels and stars outside the training set's kind (heavy tails, which the quality flags are for) do
not inflate the errors of every other star, and the errors mean what a user reads into them: the
reference value lies within +-e_<label> about 68% of the time.

Checks (:func:`lamostcannon.trust.cross_check`): pulls ``(l_CV - l_ref) / e_total`` of held-out
CV stars and ``(l_1 - l_2) / sqrt(e_random,1^2 + e_random,2^2)`` of held-out repeat pairs should
have unit spread in every S/N bin and 68% within +-1.

File: ``uncertainty_<name>.json`` beside ``model_<name>.fits`` (never confused with the label
command's ``<output>.errors.csv``), with the parameters per label, the CV skill of each label
(:func:`assess_skill`) and provenance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["LabelErrors", "ErrorModel", "fit_error_model", "pulls", "pull_summary", "SNR_REF",
           "robust_spread", "assess_skill", "write_error_model", "read_error_model",
           "MIN_PAIRS", "SKILL_MIN_CORRELATION", "SKILL_MAX_RELATIVE_PRECISION"]

#: Fewest repeat pairs for fitting the random part from pairs (else it comes from the CV).
MIN_PAIRS = 30
#: Skill rule of notebook 04: CV correlation below this, or ...
SKILL_MIN_CORRELATION = 0.3
#: ... precision relative to the unbiased range above this, and a label has no measurable skill.
SKILL_MAX_RELATIVE_PRECISION = 1.0


#: Reference S/N of the S/N exponent ``gamma`` (``snr`` as :func:`lamostcannon.ood.spectrum_snr`).
SNR_REF = 100.0


def _snr_factor(snr, gamma, snr_min=1.0):
    """``(SNR_REF / clip(snr, snr_min, SNR_REF))^gamma``: >= 1; 1 at and above ``SNR_REF``;
    constant below ``snr_min`` (the lowest S/N the fit saw: no extrapolation); NaN S/N -> 1."""
    sn = np.asarray(snr, dtype=float)
    lo = float(min(max(snr_min, 1.0), SNR_REF))
    with np.errstate(invalid="ignore", divide="ignore"):
        f = (SNR_REF / np.clip(sn, lo, SNR_REF)) ** gamma
    return np.where(np.isfinite(f), f, 1.0)


@dataclass(frozen=True)
class LabelErrors:
    """Error-model parameters of one label (physical units of the label; see the module
    docstring): ``scale >= 1``, S/N exponent ``gamma >= 0``, ``random_floor``, ``floor``."""

    scale: float = 1.0
    gamma: float = 0.0
    random_floor: float = 0.0
    floor: float = 0.0
    snr_min: float = 1.0
    #: Fraction of the reference set's quoted errors that its labels' scatter holds (fitted in
    #: [0, 1]; only for checks against those labels, never part of ``e_<label>``).
    ref_factor: float = 0.0
    #: Systematic part that scales with the formal error (star-dependent model error larger at
    #: low S/N, which repeat visits do not see): ``floor_scale * e_formal`` in quadrature with
    #: ``floor``; fitted only when repeat pairs separate it from the random part.
    floor_scale: float = 0.0

    def random(self, e_formal, snr=None):
        """``sqrt((scale e_formal g(snr))^2 + random_floor^2)``,
        ``g = (100 / clip(snr, snr_min, 100))^gamma``."""
        e = np.asarray(e_formal, dtype=float)
        if self.gamma and snr is not None:
            e = e * _snr_factor(snr, self.gamma, self.snr_min)
        return np.sqrt((self.scale * e) ** 2 + self.random_floor ** 2)

    def total(self, e_formal, snr=None):
        """``sqrt(random^2 + floor^2 + (floor_scale e_formal)^2)``."""
        e = np.asarray(e_formal, dtype=float)
        return np.sqrt(self.random(e, snr) ** 2 + self.floor ** 2 + (self.floor_scale * e) ** 2)


@dataclass
class ErrorModel:
    """Per-label :class:`LabelErrors` of one model, with the skill of each label and provenance."""

    labels: dict
    skill: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def apply(self, label_names, e_formal, snr=None):
        """Calibrated errors for formal errors (S, L) in ``label_names`` order at S/N ``snr``
        (S,) (:func:`lamostcannon.ood.spectrum_snr`).

        Returns ``(e_total, e_random)``, both (S, L). A label without parameters keeps its formal
        error (and a warning is logged).
        """
        e = np.atleast_2d(np.asarray(e_formal, dtype=float))
        tot, ran = np.empty_like(e), np.empty_like(e)
        for j, n in enumerate(label_names):
            p = self.labels.get(n)
            if p is None:
                log.warning("no calibrated error for %s: e_%s is the formal error", n, n)
                p = LabelErrors()
            ran[:, j] = p.random(e[:, j], snr)
            tot[:, j] = p.total(e[:, j], snr)
        return tot, ran

    def skilled(self, label_names=None) -> list:
        """Labels with CV skill (all labels when no skill was assessed)."""
        names = list(label_names) if label_names is not None else list(self.labels)
        return [n for n in names if self.skill.get(n, {}).get("skill", True)]

    def to_dict(self) -> dict:
        return {"model": "e_random^2 = (scale e_formal (100/clip(snr, snr_min, 100))^gamma)^2 "
                         "+ random_floor^2; e_total^2 = e_random^2 + floor^2 + "
                         "(floor_scale e_formal)^2",
                "labels": {n: {"scale": p.scale, "gamma": p.gamma,
                               "random_floor": p.random_floor, "floor": p.floor,
                               "snr_min": p.snr_min, "ref_factor": p.ref_factor,
                               "floor_scale": p.floor_scale}
                           for n, p in self.labels.items()},
                "skill": self.skill, **self.meta}

    @classmethod
    def from_dict(cls, d) -> "ErrorModel":
        labels = {n: LabelErrors(float(v["scale"]), float(v.get("gamma", 0.0)),
                                 float(v["random_floor"]), float(v["floor"]),
                                 float(v.get("snr_min", 1.0)), float(v.get("ref_factor", 0.0)),
                                 float(v.get("floor_scale", 0.0)))
                  for n, v in d["labels"].items()}
        meta = {k: v for k, v in d.items() if k not in ("model", "labels", "skill")}
        return cls(labels, dict(d.get("skill", {})), meta)


def robust_spread(x) -> float:
    """1.4826 x the median absolute deviation from the median (NaN ignored)."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(x - np.median(x))))


#: Fraction of a unit Gaussian within +-1.
_P1 = 0.6826894921370859


def _bins_of(snr, n_bins):
    """Equal-count S/N bins (index per row) for the quantile fit."""
    snr = np.asarray(snr, float)
    edges = np.unique(np.nanquantile(snr, np.linspace(0, 1, n_bins + 1)))
    return np.clip(np.searchsorted(edges, snr, side="right") - 1, 0, max(len(edges) - 2, 0))


def _bin_groups(snr, n_bins):
    b = _bins_of(snr, n_bins)
    groups = [np.flatnonzero(b == k) for k in np.unique(b)]
    return [g for g in groups if g.size >= 5] or [np.arange(len(snr))]


def _q_objective(absd, sigma, groups):
    """``sum_b n_b log(q_b)^2`` with ``q_b`` the 68.3% quantile of ``|d| / sigma`` in bin b."""
    with np.errstate(invalid="ignore", divide="ignore"):
        z = absd / sigma
    total = 0.0
    for g in groups:
        q = np.quantile(z[g], _P1)
        if not np.isfinite(q) or q <= 0:
            return 1e30
        total += g.size * np.log(q) ** 2
    return total


PAIR_WEIGHT = 1.0
N_BINS_MAX = 5


def _n_bins(n):
    return int(max(1, min(N_BINS_MAX, n // 80)))


def _scale(p):
    """The scale on the formal error, >= 1: the photon noise the formal error counts is a lower
    bound of the random error."""
    return float(1.0 + np.exp(min(float(p), 50.0)))


def _gamma(p):
    """The S/N exponent, in [0, 1]."""
    from scipy.special import expit

    return float(expit(p))


def _fit_label(d, ef, snr, er, pairs_data, *, fit_gamma=True):
    """Quantile-matching fit of one label (see :func:`fit_error_model`)."""
    from scipy.optimize import minimize

    ok = np.isfinite(d) & np.isfinite(ef) & np.isfinite(snr) & (ef > 0)
    absd, ef, snr, er = np.abs(d[ok]), ef[ok], np.clip(snr[ok], 1.0, None), er[ok]
    groups = _bin_groups(snr, _n_bins(absd.size))
    has_pairs = pairs_data is not None
    if has_pairs:
        dp, e1, e2, s1, s2 = pairs_data
        absp = np.abs(dp)
        pgroups = _bin_groups(np.fmin(s1, s2), _n_bins(absp.size) if absp.size >= 160 else
                              (2 if absp.size >= 60 else 1))
    sd = robust_spread(d[ok])
    has_ref = bool(np.any(er > 0))

    def unpack(p):
        scale = _scale(p[0])
        gamma = _gamma(p[1]) if fit_gamma else 0.0
        k = 2
        rfloor = 0.0
        if has_pairs:
            rfloor = float(np.exp(p[k]))
            k += 1
        floor = float(np.exp(p[k]))
        k += 1
        kref = 0.0
        if has_ref:
            kref = float(1.0 / (1.0 + np.exp(-p[k])))
            k += 1
        fscale = float(np.exp(min(p[k], 50.0))) if has_pairs else 0.0
        return scale, gamma, rfloor, floor, kref, fscale

    snr_min = float(np.min(snr)) if snr.size else 1.0
    if has_pairs:
        snr_min = min(snr_min, float(np.min(np.fmin(s1, s2))))

    def random(scale, gamma, rfloor, e, sn):
        return np.sqrt((scale * e * _snr_factor(sn, gamma, snr_min)) ** 2 + rfloor ** 2)

    def objective(p):
        scale, gamma, rfloor, floor, kref, fscale = unpack(p)
        r = random(scale, gamma, rfloor, ef, snr)
        total = _q_objective(absd, np.sqrt(r ** 2 + floor ** 2 + (fscale * ef) ** 2 +
                                           (kref * er) ** 2), groups)
        if has_pairs:
            sig = np.sqrt(random(scale, gamma, rfloor, e1, s1) ** 2 +
                          random(scale, gamma, rfloor, e2, s2) ** 2)
            # the pairs weigh as much as the CV stars: they alone separate random and floor
            total += PAIR_WEIGHT * absd.size / max(absp.size, 1) * _q_objective(absp, sig, pgroups)
        return total

    z0 = max(sd / max(float(np.median(ef)), 1e-12), 1.5)
    seeds = [(z0 / 2, 0.1 * sd, 0.7 * sd), (z0, 0.1 * sd, 0.1 * sd), (1.2, 0.1 * sd, 0.9 * sd)]
    if has_pairs:
        # the pairs alone first: their scale and random floor seed the joint fit, whose many
        # parameters Nelder-Mead would otherwise explore from far away
        s2p = e1 ** 2 + e2 ** 2
        zp = max(float(np.quantile(absp / np.sqrt(s2p), _P1)), 1.0 + 1e-3)
        pair_fit = minimize(
            lambda q: _q_objective(absp, np.sqrt(_scale(q[0]) ** 2 * s2p + 2 * np.exp(2 * q[1])),
                                   pgroups),
            [np.log(zp - 1.0), np.log(max(0.05 * robust_spread(dp), 1e-12))],
            method="Nelder-Mead", options={"xatol": 1e-5, "fatol": 1e-10, "maxiter": 4000})
        sc_p, rf_p = _scale(pair_fit.x[0]), float(np.exp(pair_fit.x[1]))
        rand2 = float(np.median((sc_p * ef) ** 2 + rf_p ** 2))
        seeds = [(sc_p, rf_p, np.sqrt(max(sd ** 2 - rand2, (0.3 * sd) ** 2)))] + seeds
    starts = []
    for sc, rf, fl in seeds:
        start = [np.log(max(sc - 1.0, 1e-3)), -2.0 if fit_gamma else 0.0]
        if has_pairs:
            start.append(np.log(max(rf, 1e-12)))
        start.append(np.log(max(fl, 1e-12)))
        if has_ref:
            start.append(0.0)            # half the quoted reference errors
        if has_pairs:
            start.append(np.log(0.3))    # a systematic a third of the formal error
        starts.append(start)
    best = None
    for start in starts:
        res = minimize(objective, np.asarray(start, float), method="Nelder-Mead",
                       options={"xatol": 1e-5, "fatol": 1e-10, "maxiter": 6000})
        if best is None or res.fun < best.fun:
            best = res
    scale, gamma, rfloor, floor, kref, fscale = unpack(best.x)
    return scale, gamma, rfloor, floor, kref, fscale, snr_min, int(ok.sum())


def fit_error_model(cv, label_names, *, ref_errors=None, pairs=None, rows=None,
                    min_pairs: int = MIN_PAIRS, clip: float = 4.0, fit_gamma: bool = True,
                    meta=None) -> ErrorModel:
    """Fit the error model of each label (see the module docstring).

    The parameters are chosen so that 68.3% of the normalised residuals lie within +-1 in each
    equal-count S/N bin (up to five, at least 80 stars each) of the CV residuals, and, when
    repeat pairs are given, of the pair differences (their bins weighed as much as the CV's);
    the pairs alone fix the random part, the CV then the floor.

    Parameters
    ----------
    cv : DataFrame
        Cross-validation table (:func:`lamostcannon.validation.cross_validate`) with
        ``true_<label>``, ``inferred_<label>``, ``e_<label>_formal`` and ``snr``.
    label_names : sequence of str
    ref_errors : dict label -> array (len(cv),), optional
        The reference labels' quoted 1-sigma errors, row-aligned with ``cv``. They enter the CV
        residuals' spread as ``ref_factor * e_ref`` with ``ref_factor`` fitted in [0, 1]: the
        star-to-star variation of the reference noise (it grows at the reference survey's low
        S/N) is then not mistaken for the model's, while quoted errors that overstate the
        reference labels' actual scatter cannot leave the model without an error. The constant
        part of the reference noise stays in the floor (``floor_includes_reference_noise``).
    pairs : DataFrame, optional
        Repeat pairs: ``delta_<label>`` (label difference), ``e1_<label>``, ``e2_<label>`` (the
        two formal errors) and ``snr1``, ``snr2`` (:func:`lamostcannon.real.pair_table`).
    rows : bool array (len(cv),), optional
        CV rows to fit on (the rest stays held out).
    min_pairs : int
        With fewer usable pairs, the random part comes from the CV alone (``random_floor = 0``).
    clip : float
        Residuals beyond ``clip`` sigma after the fit are counted (reported, not used).
    fit_gamma : bool
        Fit the S/N exponent (else ``gamma = 0``: errors scale with the formal error).
    meta : dict, optional
        Provenance (what it was fitted on, model hash, ...).

    Returns
    -------
    ErrorModel
    """
    from .cleaning import provenance

    t = cv if rows is None else cv[np.asarray(rows, bool)]
    sel = None if rows is None else np.asarray(rows, bool)
    if "snr" not in t.columns:
        raise KeyError("the CV table lacks 'snr' (run cross_validate with diagnostics=True)")
    params, info = {}, {}
    for n in label_names:
        for c in (f"true_{n}", f"inferred_{n}", f"e_{n}_formal"):
            if c not in t.columns:
                raise KeyError(f"the CV table lacks {c!r} (run cross_validate with "
                               "diagnostics=True)")
        d = t[f"inferred_{n}"].to_numpy(float) - t[f"true_{n}"].to_numpy(float)
        ef = t[f"e_{n}_formal"].to_numpy(float)
        snr = t["snr"].to_numpy(float)
        er = np.zeros_like(d)
        has_ref = ref_errors is not None and n in ref_errors
        if has_ref:
            er = np.asarray(ref_errors[n], float)
            er = er if sel is None else er[sel]
            er = np.where(np.isfinite(er), er, 0.0)
        pair_data, n_pairs = None, 0
        if pairs is not None and f"delta_{n}" in pairs.columns:
            cols = [pairs[c].to_numpy(float) for c in (f"delta_{n}", f"e1_{n}", f"e2_{n}",
                                                       "snr1", "snr2")]
            okp = np.all([np.isfinite(c) for c in cols], axis=0) & (cols[1] > 0) & (cols[2] > 0)
            n_pairs = int(okp.sum())
            if n_pairs >= min_pairs:
                pair_data = tuple(np.clip(c[okp], 1.0, None) if k >= 3 else c[okp]
                                  for k, c in enumerate(cols))
        scale, gamma, rfloor, floor, kref, fscale, snr_min, n_cv = _fit_label(
            d, ef, snr, er, pair_data, fit_gamma=fit_gamma)
        typical = float(np.nanmedian(np.sqrt((scale * ef) ** 2 + rfloor ** 2 + floor ** 2)))
        floor = floor if floor > 1e-3 * typical else 0.0
        rfloor = rfloor if rfloor > 1e-3 * typical else 0.0
        fscale = fscale if fscale > 1e-3 else 0.0
        p = LabelErrors(scale, gamma, rfloor, floor, snr_min, kref, fscale)
        params[n] = p
        z = d / np.sqrt(p.total(ef, snr) ** 2 + (kref * er) ** 2)
        info[n] = {"fitted_from": "CV (floor) + repeat pairs (random part)" if pair_data is not
                   None else "CV (random part and floor together)",
                   "n_cv": n_cv, f"n_cv_beyond_{clip:g}_sigma": int(np.sum(np.abs(z) > clip)),
                   "n_pairs": n_pairs if pair_data is not None else 0,
                   "reference_error_factor": kref if has_ref else None,
                   "floor_includes_reference_noise": True}
        log.info("%s: scale %.3g, gamma %.2f, random floor %.3g, floor %.3g (%s)", n, scale,
                 gamma, rfloor, floor, info[n]["fitted_from"])
    record = {"per_label": info, "snr_ref": SNR_REF,
              "fit": "68.3% quantile of |pull| = 1 in equal-count S/N bins (CV and pairs)",
              "provenance": {**provenance(), **(meta or {})}}
    return ErrorModel(params, {}, record)


def pulls(delta, sigma) -> np.ndarray:
    """``delta / sigma`` (NaN where either is not finite or sigma <= 0)."""
    delta = np.asarray(delta, float)
    sigma = np.asarray(sigma, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.isfinite(sigma) & (sigma > 0), delta / sigma, np.nan)


def pull_summary(pull, snr, bins=None, n_bins: int = 3):
    """Spread of pulls per S/N bin, and a row ``all``.

    Columns: ``n``; ``spread``, the 68.3% quantile of ``|pull|`` (1 for unit Gaussian pulls);
    ``se``, its sampling error for Gaussian pulls (``0.96 / sqrt(n)``); ``robust``
    (1.4826 MAD); ``std`` (of the pulls within +-5); ``within_1``, the fraction with
    ``|pull| < 1`` (68.3% for unit Gaussian pulls).

    Parameters
    ----------
    pull, snr : arrays (S,)
    bins : sequence of S/N edges, optional
        Default: ``n_bins`` bins with equal numbers of stars.
    """
    import pandas as pd

    pull = np.asarray(pull, float)
    snr = np.asarray(snr, float)
    ok = np.isfinite(pull) & np.isfinite(snr)
    pull, snr = pull[ok], snr[ok]
    if bins is None:
        bins = np.unique(np.quantile(snr, np.linspace(0, 1, n_bins + 1))) if snr.size else [0, 1]
        bins = np.asarray(bins, float)
        bins[-1] = np.nextafter(bins[-1], np.inf)
    bins = np.asarray(bins, float)
    rows = []

    def row(name, p):
        core = p[np.abs(p) < 5]
        return {"snr_bin": name, "n": int(p.size),
                "spread": float(np.quantile(np.abs(p), _P1)) if p.size else np.nan,
                "se": 0.96 / np.sqrt(p.size) if p.size else np.nan, "robust": robust_spread(p),
                "std": float(np.std(core)) if core.size else np.nan,
                "within_1": float(np.mean(np.abs(p) < 1)) if p.size else np.nan}

    for lo, hi in zip(bins[:-1], bins[1:]):
        sel = (snr >= lo) & (snr < hi)
        rows.append(row(f"{lo:.0f}-{hi:.0f}", pull[sel]))
    rows.append(row("all", pull))
    return pd.DataFrame(rows).set_index("snr_bin")


def assess_skill(metrics, precision=None, *, min_correlation: float = SKILL_MIN_CORRELATION,
                 max_relative_precision: float = SKILL_MAX_RELATIVE_PRECISION) -> dict:
    """Which labels the CV shows skill for (the rule of notebook 04).

    A label has skill when its CV correlation with the reference labels lies above
    ``min_correlation`` by three standard errors (``r - 3 (1 - r^2) / sqrt(n) >= min_correlation``,
    with ``n`` the CV stars, where ``metrics`` has an ``n`` column; else ``r >= min_correlation``)
    and its precision relative to the unbiased range
    (:func:`lamostcannon.validation.unbiased_precision`) is at most ``max_relative_precision``.
    Otherwise the model cannot rank stars by it, or its errors are as wide as the range it can
    report. The margin keeps a label whose correlation is at the threshold from changing its
    verdict from one realisation (or one reference set) to the next.

    Returns
    -------
    dict label -> {"skill": bool, "correlation": float, "relative_precision": float or None,
    "rule": str}
    """
    rule = (f"skill = CV correlation - 3 standard errors >= {min_correlation:g} and relative "
            f"precision <= {max_relative_precision:g}")
    out = {}
    for n in metrics.index:
        r = float(metrics.loc[n, "correlation"])
        rp = None
        if precision is not None and n in precision.index:
            rp = float(precision.loc[n, "relative_precision"])
        n_cv = float(metrics.loc[n, "n"]) if "n" in metrics.columns else np.inf
        margin = 3.0 * (1.0 - r ** 2) / np.sqrt(n_cv) if n_cv > 0 else np.inf
        ok = np.isfinite(r) and r - margin >= min_correlation
        if rp is not None and np.isfinite(rp):
            ok = ok and rp <= max_relative_precision
        out[n] = {"skill": bool(ok), "correlation": r,
                  "relative_precision": rp if rp is None or np.isfinite(rp) else None,
                  "rule": rule}
    return out


def write_error_model(model: ErrorModel, path) -> Path:
    """Write ``uncertainty_<name>.json`` (temporary name, then renamed into place)."""
    from . import paths

    path = paths.write_json(path, model.to_dict())
    log.info("wrote %s", path)
    return path


def read_error_model(path) -> ErrorModel:
    """Read :func:`write_error_model` output; a clear error for a broken file."""
    from . import paths

    data = paths.read_json(path, "an uncertainty calibration")
    try:
        return ErrorModel.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not an uncertainty calibration file: {exc}") from exc

