"""Chemical similarity of wide binaries and of an open cluster (paper section 5.2, appendix B).

The paper compares El-Badry et al. (2019, EB19) wide binaries, both stars LAMOST dwarfs with
``Delta teff < 250 K``, with random pairs of field dwarfs drawn to have the same
``Delta [Fe/H]`` distribution, using the precision-scaled chemical distance of eq. 6,

.. math:: d = \\sqrt{\\sum_i (\\Delta[X_i/{\\rm Fe}] / \\sigma_i)^2},

where :math:`\\sigma_i` is the cross-validation scatter of element *i*. Binaries peak near
``d ~ 0.8``, field pairs near ``d ~ 2.5`` (Fig 9).

Choice of sigma. Like the paper, :func:`chemical_distance` divides by the *single-star* CV
scatter ``sigma_i`` (``pair_scaling=False``, the default), so the numbers are comparable to the
paper's. For two independent stars with the same true abundance the difference has standard
deviation ``sqrt(2) sigma_i``; ``pair_scaling=True`` divides by that instead (then a pair of
identical stars measured with CV-sized errors has ``E[d^2] = K`` for K elements). Both choices
rescale every distance by the same factor ``sqrt(2)``, so the comparison of binaries and field
pairs does not depend on it.

Pair tables. A pair table is a :class:`pandas.DataFrame` with one row per pair and the catalogue
columns of the two stars suffixed ``_1`` and ``_2`` (``teff_1``, ``teff_2``, ``fe_h_1``, ...).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

#: Maximum teff difference of a pair [K] (paper section 5.2).
MAX_DELTA_TEFF = 250.0
#: Cantat-Gaudin et al. (2018) name of Praesepe.
PRAESEPE = "NGC_2632"


# ----------------------------------------------------------------------------- distances
def _sigma_vector(sigma, elements):
    if isinstance(sigma, dict) or hasattr(sigma, "keys"):
        missing = [e for e in elements if e not in sigma]
        if missing:
            raise KeyError(f"no CV sigma for {missing}; sigma has {list(sigma.keys())}")
        s = np.array([float(sigma[e]) for e in elements])
    else:
        s = np.atleast_1d(np.asarray(sigma, dtype=float))
        if s.shape != (len(elements),):
            raise ValueError(f"sigma has shape {s.shape}, expected ({len(elements)},) for {elements}")
    if not np.all(np.isfinite(s) & (s > 0)):
        raise ValueError(f"sigma must be positive and finite, got {s}")
    return s


def chemical_distance(delta, sigma, *, pair_scaling=False):
    """Precision-scaled Euclidean chemical distance, paper eq. 6.

    Parameters
    ----------
    delta : array (N, K) or (K,)
        Abundance differences ``Delta [X_i/Fe]`` [dex] of N pairs in K elements.
    sigma : array (K,)
        Single-star CV scatter ``sigma_i`` of each element [dex].
    pair_scaling : bool
        Divide by ``sqrt(2) sigma_i`` (the scatter of a difference) instead of ``sigma_i``
        (the paper's choice, default).

    Returns
    -------
    d : array (N,) (or a float for one pair); NaN where any difference is NaN.
    """
    delta = np.asarray(delta, dtype=float)
    one = delta.ndim == 1
    delta = np.atleast_2d(delta)
    sigma = np.atleast_1d(np.asarray(sigma, dtype=float))
    if delta.shape[1] != sigma.shape[0]:
        raise ValueError(f"delta has {delta.shape[1]} elements (shape {delta.shape}), sigma {sigma.shape}")
    scale = sigma * (np.sqrt(2.0) if pair_scaling else 1.0)
    d = np.sqrt(np.sum((delta / scale) ** 2, axis=1))
    return float(d[0]) if one else d


def pair_distance(pairs, elements, sigma, *, pair_scaling=False):
    """Eq. 6 for a pair table: ``elements`` are label names like ``"o_fe"``; ``sigma`` a dict
    ``{element: CV scatter}`` or an array in the order of ``elements``. Returns array (N,)."""
    elements = list(elements)
    s = _sigma_vector(sigma, elements)
    delta = np.column_stack([np.asarray(pairs[f"{e}_1"], float) - np.asarray(pairs[f"{e}_2"], float)
                             for e in elements]) if elements else np.zeros((len(pairs), 0))
    return chemical_distance(delta, s, pair_scaling=pair_scaling)


# ----------------------------------------------------------------------------- selection
def is_dwarf(catalog):
    """Dwarf mask of a catalogue: ``~giantmodel`` when present, else not :func:`labels.is_giant`.

    Stars without teff or logg are neither (``False``)."""
    from .labels import is_giant

    teff = np.asarray(catalog["teff"], float)
    logg = np.asarray(catalog["logg"], float)
    known = np.isfinite(teff) & np.isfinite(logg)
    if "giantmodel" in _columns(catalog):
        giant = np.asarray(catalog["giantmodel"], bool)
    else:
        giant = is_giant(teff, logg)
    return known & ~giant


def _columns(table):
    return list(getattr(table, "colnames", None) or getattr(table, "columns", []))


def _to_frame(table):
    import pandas as pd

    if isinstance(table, pd.DataFrame):
        return table
    return table.to_pandas()


def binary_pairs(catalog, binaries, *, id_col="source_id", max_delta_teff=MAX_DELTA_TEFF,
                 dwarfs_only=True):
    """Wide-binary pairs with both stars in the catalogue (paper section 5.2).

    Parameters
    ----------
    catalog : DataFrame or Table with ``id_col``, ``teff``, ``logg`` (and ``giantmodel``) and
        the labels; apply the science quality cut (e.g. ``chi2 < 7000``) before.
    binaries : EB19-like table with ``source_id1``, ``source_id2`` (other columns are kept).
    max_delta_teff : keep pairs with ``|teff_1 - teff_2| < max_delta_teff`` [K] (None: no cut).
    dwarfs_only : both stars must be dwarfs (:func:`is_dwarf`).

    Returns
    -------
    pair table (DataFrame): the binaries' columns, then catalogue columns suffixed ``_1``/``_2``
    and ``delta_teff``, ``delta_fe_h`` (absolute differences).
    """
    cat = _to_frame(catalog)
    bins = _to_frame(binaries)
    for c in ("source_id1", "source_id2"):
        if c not in bins.columns:
            raise KeyError(f"binaries table needs {c}; it has {list(bins.columns)}")
    if id_col not in cat.columns:
        raise KeyError(f"catalogue needs {id_col}; it has {list(cat.columns)}")
    cat = cat.assign(_dwarf=is_dwarf(cat)).drop_duplicates(id_col)
    pairs = bins.copy()
    for k in (1, 2):
        sub = cat.add_suffix(f"_{k}").rename(columns={f"{id_col}_{k}": f"source_id{k}"})
        pairs = pairs.merge(sub, on=f"source_id{k}", how="inner", suffixes=("", f"_cat{k}"))
    n_found = len(pairs)
    pairs = _add_deltas(pairs)
    keep = np.isfinite(pairs["delta_teff"].to_numpy(float))
    keep &= np.isfinite(pairs["logg_1"].to_numpy(float)) & np.isfinite(pairs["logg_2"].to_numpy(float))
    if dwarfs_only:
        keep &= pairs["_dwarf_1"].to_numpy(bool) & pairs["_dwarf_2"].to_numpy(bool)
    if max_delta_teff is not None:
        keep &= pairs["delta_teff"].to_numpy(float) < max_delta_teff
    out = pairs.loc[keep].drop(columns=["_dwarf_1", "_dwarf_2"]).reset_index(drop=True)
    log.info("binary_pairs: %d of %d binaries in the catalogue, %d pass (dwarfs=%s, dteff<%s)",
             n_found, len(bins), len(out), dwarfs_only, max_delta_teff)
    return out


def _add_deltas(pairs):
    pairs["delta_teff"] = np.abs(pairs["teff_1"].to_numpy(float) - pairs["teff_2"].to_numpy(float))
    pairs["delta_fe_h"] = np.abs(pairs["fe_h_1"].to_numpy(float) - pairs["fe_h_2"].to_numpy(float))
    return pairs


def field_pairs(field, target_delta_fe_h, n_pairs, *, rng=None, seed=None, bins=20,
                max_delta_teff=MAX_DELTA_TEFF, exclude_ids=None, id_col="source_id",
                batch_size=200_000, max_batches=1000):
    """Random field pairs matched in ``|Delta [Fe/H]|`` to a target sample, by rejection sampling.

    Algorithm
    ---------
    1. *Target density* p: histogram (``bins``; an int or edges, on ``[0, max target]``) of the
       target's ``|Delta [Fe/H]|`` (the binaries'), normalised per bin.
    2. *Proposal* q: uniformly random pairs ``(i, j)``, ``i != j``, of field stars that pass the
       same cuts as the binaries (``|Delta teff| < max_delta_teff``; the caller passes field
       dwarfs with the same quality cuts). A first batch of proposals estimates q on the same
       bins.
    3. A proposal falling in bin b is accepted with probability ``w_b = (p_b / q_b) / max(p/q)``
       (zero outside the target's range), so accepted pairs follow p (up to the bin width).
       Batches of ``batch_size`` proposals are drawn until ``n_pairs`` are accepted; a pair of
       stars is used at most once. Target bins with no proposals cannot be matched and are
       logged as a warning.

    Parameters
    ----------
    field : DataFrame/Table of candidate field stars (``teff``, ``fe_h``, labels).
    target_delta_fe_h : array, the binaries' ``|Delta [Fe/H]|`` [dex].
    n_pairs : number of field pairs to return.
    rng, seed : a ``numpy.random.Generator`` or a seed (one of them; default seed 0).
    exclude_ids : ids (``id_col``) left out of the field (e.g. the binaries' members).

    Returns
    -------
    pair table (DataFrame) like :func:`binary_pairs` with ``n_pairs`` rows (fewer, with a
    warning, if ``max_batches`` did not suffice), plus ``index_1``, ``index_2`` (row positions
    in ``field`` after exclusion).
    """
    if rng is None:
        rng = np.random.default_rng(0 if seed is None else seed)
    elif seed is not None:
        raise ValueError("give rng or seed, not both")
    cat = _to_frame(field)
    if exclude_ids is not None and id_col in cat.columns:
        cat = cat.loc[~cat[id_col].isin(np.asarray(exclude_ids))]
    cat = cat.reset_index(drop=True)
    teff = cat["teff"].to_numpy(float)
    feh = cat["fe_h"].to_numpy(float)
    ok = np.flatnonzero(np.isfinite(teff) & np.isfinite(feh))
    if ok.size < 2:
        raise ValueError(f"need at least 2 field stars with teff and fe_h, got {ok.size}")
    target = np.abs(np.asarray(target_delta_fe_h, float))
    target = target[np.isfinite(target)]
    if target.size == 0:
        raise ValueError("target_delta_fe_h has no finite values")
    edges = np.asarray(bins, float) if np.ndim(bins) else np.linspace(0.0, target.max() * (1 + 1e-9) + 1e-12, int(bins) + 1)
    p, _ = np.histogram(target, edges)
    p = p / p.sum()

    def propose(n):
        i = ok[rng.integers(ok.size, size=n)]
        j = ok[rng.integers(ok.size, size=n)]
        keep = i != j
        if max_delta_teff is not None:
            keep &= np.abs(teff[i] - teff[j]) < max_delta_teff
        i, j = i[keep], j[keep]
        return i, j, np.abs(feh[i] - feh[j])

    i0, j0, d0 = propose(batch_size)
    q, _ = np.histogram(d0, edges)
    q = q / max(d0.size, 1)
    ratio = np.divide(p, q, out=np.zeros_like(p), where=q > 0)
    unmatched = (p > 0) & (q == 0)
    if unmatched.any():
        log.warning("field_pairs: %d target bins hold no field proposals (%.1f%% of the target)",
                    int(unmatched.sum()), 100 * p[unmatched].sum())
    if ratio.max() <= 0:
        raise ValueError("no field pair falls in the range of the target Delta[Fe/H]")
    w = ratio / ratio.max()

    accepted_i, accepted_j, seen = [], [], set()
    n_acc, batch = 0, 0
    i, j, d = i0, j0, d0
    while n_acc < n_pairs and batch < max_batches:
        b = np.searchsorted(edges, d, side="right") - 1
        inside = (b >= 0) & (b < len(p))
        prob = np.zeros(d.size)
        prob[inside] = w[b[inside]]
        acc = rng.random(d.size) < prob
        for a, c in zip(i[acc], j[acc]):
            key = (min(a, c), max(a, c))
            if key in seen:
                continue
            seen.add(key)
            accepted_i.append(a)
            accepted_j.append(c)
            n_acc += 1
            if n_acc == n_pairs:
                break
        batch += 1
        if n_acc < n_pairs:
            i, j, d = propose(batch_size)
    if n_acc < n_pairs:
        log.warning("field_pairs: only %d of %d pairs after %d batches", n_acc, n_pairs, batch)
    ia, ja = np.asarray(accepted_i, int), np.asarray(accepted_j, int)
    s1 = cat.iloc[ia].add_suffix("_1").reset_index(drop=True)
    s2 = cat.iloc[ja].add_suffix("_2").reset_index(drop=True)
    import pandas as pd

    out = pd.concat([s1, s2], axis=1)
    out["index_1"], out["index_2"] = ia, ja
    log.info("field_pairs: %d pairs, acceptance %.3g", n_acc, n_acc / max(batch * batch_size, 1))
    return _add_deltas(out)


# ----------------------------------------------------------------------------- summaries
def kde_peak(values, *, grid=None, bw_method=None):
    """Mode of a Gaussian KDE (scipy, Scott's rule by default) of the finite ``values``.

    ``grid`` defaults to 2000 points on ``[0, max(values)]`` (distances are non-negative)."""
    from scipy.stats import gaussian_kde

    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return np.nan
    if grid is None:
        grid = np.linspace(min(0.0, v.min()), v.max(), 2000)
    dens = gaussian_kde(v, bw_method=bw_method)(grid)
    return float(grid[np.argmax(dens)])


def separation_growth(binaries, field, elements, sigma, *, pair_scaling=False):
    """How binaries and field pairs separate as elements are added one at a time.

    For k = 1..K the distance of eq. 6 uses the first k entries of ``elements`` (in the order
    given). Returns a DataFrame with one row per k: ``n_elements``, ``added`` (the element
    added), ``median_binary``, ``median_field``, ``ratio`` (= median_field / median_binary),
    ``difference`` (= median_field - median_binary),
    ``peak_binary``, ``peak_field`` (KDE modes, :func:`kde_peak`). Pairs with a NaN in any of
    the first k elements are left out at that step.
    """
    import pandas as pd

    elements = list(elements)
    s = _sigma_vector(sigma, elements)
    rows = []
    for k in range(1, len(elements) + 1):
        db = pair_distance(binaries, elements[:k], s[:k], pair_scaling=pair_scaling)
        df = pair_distance(field, elements[:k], s[:k], pair_scaling=pair_scaling)
        mb, mf = np.nanmedian(db), np.nanmedian(df)
        rows.append(dict(n_elements=k, added=elements[k - 1], median_binary=mb, median_field=mf,
                         ratio=mf / mb if mb > 0 else np.nan, difference=mf - mb,
                         peak_binary=kde_peak(db), peak_field=kde_peak(df)))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- clusters
def cluster_members(catalog, members, cluster=PRAESEPE, *, min_proba=0.5, id_col="source_id",
                    dwarfs_only=False):
    """Catalogue rows of the members of one cluster (Cantat-Gaudin et al. 2018 style table:
    ``source_id``, ``cluster``, ``proba``). Members with ``proba >= min_proba`` are kept."""
    cat = _to_frame(catalog)
    mem = _to_frame(members)
    names = mem["cluster"].astype(str).str.strip()
    sel = mem.loc[(names == cluster) & (mem["proba"].to_numpy(float) >= min_proba), [id_col, "proba"]]
    out = cat.merge(sel.drop_duplicates(id_col), on=id_col, how="inner")
    if dwarfs_only:
        out = out.loc[is_dwarf(out)].reset_index(drop=True)
    log.info("cluster_members: %s has %d members in the catalogue", cluster, len(out))
    return out


@dataclass(frozen=True)
class ClusterTrend:
    """Linear trend of an abundance with teff in a cluster (paper appendix B, Fig 17).

    ``slope`` [dex/K] and ``intercept`` [dex] of the least-squares line ``a = intercept + slope
    * teff``; ``slope_err`` its standard error; ``dispersion`` the standard deviation (ddof=1) of
    the abundance, the paper's number (0.07 dex for [alpha/Fe] in Praesepe);
    ``residual_dispersion`` the scatter about the line; ``n`` the number of stars used.
    """

    slope: float
    slope_err: float
    intercept: float
    dispersion: float
    residual_dispersion: float
    n: int

    @property
    def slope_per_1000K(self) -> float:
        return 1000.0 * self.slope

    def predict(self, teff):
        return self.intercept + self.slope * np.asarray(teff, float)


def teff_trend(teff, abundance):
    """Fit :class:`ClusterTrend` to finite (teff [K], abundance [dex]) pairs (needs >= 3)."""
    t = np.asarray(teff, float)
    a = np.asarray(abundance, float)
    if t.shape != a.shape:
        raise ValueError(f"teff {t.shape} and abundance {a.shape} differ in shape")
    ok = np.isfinite(t) & np.isfinite(a)
    t, a = t[ok], a[ok]
    n = t.size
    if n < 3:
        raise ValueError(f"need at least 3 stars with teff and abundance, got {n}")
    A = np.column_stack([np.ones(n), t - t.mean()])
    coef, *_ = np.linalg.lstsq(A, a, rcond=None)
    resid = a - A @ coef
    s2 = resid @ resid / (n - 2)
    slope_err = np.sqrt(s2 / np.sum((t - t.mean()) ** 2))
    slope = coef[1]
    return ClusterTrend(slope=float(slope), slope_err=float(slope_err),
                        intercept=float(coef[0] - slope * t.mean()),
                        dispersion=float(np.std(a, ddof=1)),
                        residual_dispersion=float(np.sqrt(s2)), n=int(n))
