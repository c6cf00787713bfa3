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

Wide binaries done right (beyond the paper). Field pairs can be matched to the binaries not only
in ``|Delta [Fe/H]|`` but per star in S/N and distance and per pair in ``|Delta teff|``
(:func:`field_pairs` with ``match_star`` and ``match_delta_teff``; :func:`add_astrometry` adds the
Gaia parallax and Bailer-Jones distance); a null control gives every star the abundances of a
random star of its (teff, logg, [Fe/H]) bin (:func:`shuffle_within_bins`) and must separate
nothing; :func:`separation` measures the separation as an AUC with its error; and
:func:`binary_split` splits the binaries deterministically into a half that calibrates
(:mod:`lamostcannon.calibration`) and a half that judges (:func:`calibration_comparison`).

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


def pair_distance(pairs, elements, sigma, *, pair_scaling=False, errors=None):
    """Eq. 6 for a pair table: ``elements`` are label names like ``"o_fe"``; ``sigma`` a dict
    ``{element: CV scatter}`` or an array in the order of ``elements``. Returns array (N,).

    ``errors`` (beyond the paper): a list of error columns, one per element (e.g.
    ``["e_o_fe", ...]``); each difference is then divided by its own pair's error,
    ``sqrt(e_1^2 + e_2^2)``, instead of by ``sigma`` (which is then only validated), so a star
    whose abundances are noisier (a cool dwarf, or a calibrated value divided by a gain below 1)
    weighs less. Pairs with a non-finite or non-positive error get NaN."""
    elements = list(elements)
    s = _sigma_vector(sigma, elements)
    delta = np.column_stack([np.asarray(pairs[f"{e}_1"], float) - np.asarray(pairs[f"{e}_2"], float)
                             for e in elements]) if elements else np.zeros((len(pairs), 0))
    if errors is None:
        return chemical_distance(delta, s, pair_scaling=pair_scaling)
    errors = list(errors)
    if len(errors) != len(elements):
        raise ValueError(f"{len(errors)} error columns for {len(elements)} elements")
    err = np.column_stack([np.hypot(np.asarray(pairs[f"{c}_1"], float),
                                    np.asarray(pairs[f"{c}_2"], float)) for c in errors])
    err = np.where(np.isfinite(err) & (err > 0), err, np.nan)
    return np.sqrt(np.sum((delta / err) ** 2, axis=1))


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


def binary_split(binaries) -> np.ndarray:
    """Deterministic half of each wide binary: ``"fit"`` (calibrates) or ``"judge"`` (tests).

    A pair is ``"fit"`` when the first byte of ``blake2b("<smaller id>-<larger id>")`` is even.
    The split depends on the two Gaia ``source_id`` only (not on the row order, the seed or the
    other pairs), so a binary that calibrates (:mod:`lamostcannon.calibration`) is never used to
    judge the calibration.

    Parameters
    ----------
    binaries : EB19-like table with ``source_id1``, ``source_id2``

    Returns
    -------
    array (N,) of str
    """
    import hashlib

    b = _to_frame(binaries)
    for c in ("source_id1", "source_id2"):
        if c not in b.columns:
            raise KeyError(f"binaries table needs {c}; it has {list(b.columns)}")
    a = b["source_id1"].to_numpy(np.int64)
    c = b["source_id2"].to_numpy(np.int64)
    lo, hi = np.minimum(a, c), np.maximum(a, c)
    byte = np.array([hashlib.blake2b(f"{x}-{y}".encode(), digest_size=1).digest()[0]
                     for x, y in zip(lo, hi)], dtype=int)
    return np.where(byte % 2 == 0, "fit", "judge").astype(object)


def add_astrometry(catalog, gaia=None, distances=None, *, id_col="source_id"):
    """The catalogue with Gaia ``parallax``, ``parallax_over_error`` and Bailer-Jones ``r_est`` (pc).

    Joined on ``id_col``; stars without a match get NaN. Used to match field pairs to the
    binaries in distance (and to apply El-Badry et al.-like astrometric cuts).
    """
    cat = _to_frame(catalog).copy()
    n = len(cat)
    for c in ("parallax", "parallax_over_error", "r_est"):
        cat[c] = np.full(n, np.nan)
    if gaia is not None:
        g = _to_frame(gaia)[[id_col, "parallax", "parallax_error"]].drop_duplicates(id_col)
        j = cat[[id_col]].merge(g, on=id_col, how="left")
        cat["parallax"] = j["parallax"].to_numpy(float)
        cat["parallax_over_error"] = (j["parallax"] / j["parallax_error"]).to_numpy(float)
    if distances is not None:
        d = _to_frame(distances)[[id_col, "r_est"]].drop_duplicates(id_col)
        cat["r_est"] = cat[[id_col]].merge(d, on=id_col, how="left")["r_est"].to_numpy(float)
    return cat


def _star_weights(field_values, target_values, n_bins):
    """Per-star weights that turn the field's distribution of some columns into the target's.

    Both arguments are (S, M) arrays; bins are target quantiles per column (``n_bins`` each);
    field stars outside the target's range or with non-finite values get weight 0.
    """
    f = np.asarray(field_values, float)
    t = np.asarray(target_values, float)
    t = t[np.isfinite(t).all(axis=1)]
    if t.shape[0] < 2:
        raise ValueError("need at least 2 target stars with finite matching columns")
    idx_f = np.zeros(len(f), np.int64)
    idx_t = np.zeros(len(t), np.int64)
    inside = np.isfinite(f).all(axis=1)
    n_cells = 1
    for m in range(f.shape[1]):
        edges = np.unique(np.quantile(t[:, m], np.linspace(0.0, 1.0, n_bins + 1)))
        if edges.size < 2:
            edges = np.array([t[0, m] - 0.5, t[0, m] + 0.5])
        nb = edges.size - 1
        bt = np.clip(np.searchsorted(edges, t[:, m], side="right") - 1, 0, nb - 1)
        with np.errstate(invalid="ignore"):
            bf = np.searchsorted(edges, f[:, m], side="right") - 1
            bf[f[:, m] == edges[-1]] = nb - 1
        inside &= (bf >= 0) & (bf < nb)
        idx_f = idx_f * nb + np.clip(bf, 0, nb - 1)
        idx_t = idx_t * nb + bt
        n_cells *= nb
    p = np.bincount(idx_t, minlength=n_cells) / len(t)
    q = np.bincount(idx_f[inside], minlength=n_cells) / max(inside.sum(), 1)
    ratio = np.divide(p, q, out=np.zeros_like(p), where=q > 0)
    w = np.where(inside, ratio[idx_f], 0.0)
    missed = p[(q == 0) & (p > 0)].sum()
    if missed > 0:
        log.warning("field_pairs: %.1f%% of the target stars fall in cells without field stars",
                    100 * missed)
    return w


def field_pairs(field, target_delta_fe_h, n_pairs, *, rng=None, seed=None, bins=20,
                max_delta_teff=MAX_DELTA_TEFF, exclude_ids=None, id_col="source_id",
                batch_size=200_000, max_batches=1000, match_star=(), match_delta_teff=False,
                star_bins=5, teff_bins=6):
    """Random field pairs matched to a target sample (the binaries), by rejection sampling.

    Algorithm
    ---------
    1. *Stars* (optional, ``match_star``): each field star gets a weight that turns the field's
       distribution of the ``match_star`` columns (e.g. ``snr_z`` and ``r_est``: the S/N and the
       distance) into that of the binaries' stars (binned on ``star_bins`` target quantiles per
       column); proposals draw stars with these weights, so each star of a field pair is like a
       binary star in S/N and distance.
    2. *Target density* p of the pairs: histogram (``bins``; an int or edges, on ``[0, max
       target]``) of the target's ``|Delta [Fe/H]|``; with ``match_delta_teff`` jointly with
       ``|Delta teff|`` (``teff_bins`` target quantiles).
    3. *Proposal* q: random pairs ``(i, j)``, ``i != j``, of field stars that pass the same cuts
       as the binaries (``|Delta teff| < max_delta_teff``; the caller passes field dwarfs with the
       same quality cuts). A first batch of proposals estimates q on the same bins.
    4. A proposal falling in bin b is accepted with probability ``w_b = (p_b / q_b) / max(p/q)``
       (zero outside the target's range), so accepted pairs follow p (up to the bin width).
       Batches of ``batch_size`` proposals are drawn until ``n_pairs`` are accepted; a pair of
       stars is used at most once. Target bins with no proposals cannot be matched and are
       logged as a warning.

    Parameters
    ----------
    field : DataFrame/Table of candidate field stars (``teff``, ``fe_h``, labels, and the
        ``match_star`` columns).
    target_delta_fe_h : array of the binaries' ``|Delta [Fe/H]|`` [dex], or their pair table
        (:func:`binary_pairs`: ``delta_fe_h``, ``delta_teff`` and ``<column>_1/_2``), which
        ``match_star`` and ``match_delta_teff`` need.
    n_pairs : number of field pairs to return.
    rng, seed : a ``numpy.random.Generator`` or a seed (one of them; default seed 0).
    exclude_ids : ids (``id_col``) left out of the field (e.g. the binaries' members).
    match_star : sequence of column names matched per star (step 1).
    match_delta_teff : also match the pairs' ``|Delta teff|`` (step 2).

    Returns
    -------
    pair table (DataFrame) like :func:`binary_pairs` with ``n_pairs`` rows (fewer, with a
    warning, if ``max_batches`` did not suffice), plus ``index_1``, ``index_2`` (row positions
    in ``field`` after exclusion).
    """
    import pandas as pd

    if rng is None:
        rng = np.random.default_rng(0 if seed is None else seed)
    elif seed is not None:
        raise ValueError("give rng or seed, not both")
    match_star = tuple(match_star)
    target_table = target_delta_fe_h if isinstance(target_delta_fe_h, pd.DataFrame) else None
    if target_table is None and (match_star or match_delta_teff):
        raise ValueError("match_star and match_delta_teff need the binaries' pair table as target")
    cat = _to_frame(field)
    if exclude_ids is not None and id_col in cat.columns:
        cat = cat.loc[~cat[id_col].isin(np.asarray(exclude_ids))]
    cat = cat.reset_index(drop=True)
    teff = cat["teff"].to_numpy(float)
    feh = cat["fe_h"].to_numpy(float)
    usable = np.isfinite(teff) & np.isfinite(feh)
    star_w = np.ones(len(cat))
    if match_star:
        missing = [c for c in match_star if c not in cat.columns]
        missing += [f"{c}_{k}" for c in match_star for k in (1, 2)
                    if f"{c}_{k}" not in target_table.columns]
        if missing:
            raise KeyError(f"columns to match are missing: {missing}")
        tv = np.vstack([np.column_stack([target_table[f"{c}_{k}"].to_numpy(float)
                                         for c in match_star]) for k in (1, 2)])
        star_w = _star_weights(cat[list(match_star)].to_numpy(float), tv, star_bins)
    ok = np.flatnonzero(usable & (star_w > 0))
    if ok.size < 2:
        raise ValueError(f"need at least 2 field stars with teff and fe_h (and matching columns), "
                         f"got {ok.size}")
    prob = star_w[ok] / star_w[ok].sum()
    delta = target_table["delta_fe_h"] if target_table is not None else target_delta_fe_h
    target = np.abs(np.asarray(delta, float))
    finite = np.isfinite(target)
    if match_delta_teff:
        dt_target = np.abs(target_table["delta_teff"].to_numpy(float))
        finite &= np.isfinite(dt_target)
        dt_target = dt_target[finite]
    target = target[finite]
    if target.size == 0:
        raise ValueError("target_delta_fe_h has no finite values")
    edges = np.asarray(bins, float) if np.ndim(bins) else np.linspace(0.0, target.max() * (1 + 1e-9) + 1e-12, int(bins) + 1)
    n_fe = len(edges) - 1
    if match_delta_teff:
        t_edges = np.unique(np.quantile(dt_target, np.linspace(0, 1, teff_bins + 1)))
        t_edges[-1] = t_edges[-1] * (1 + 1e-9) + 1e-9
        t_edges[0] = 0.0
        n_t = max(len(t_edges) - 1, 1)
    else:
        t_edges, n_t = None, 1

    def cell(dfe, dt):
        b = np.searchsorted(edges, dfe, side="right") - 1
        inside = (b >= 0) & (b < n_fe)
        if t_edges is None:
            return np.where(inside, b, -1)
        bt = np.searchsorted(t_edges, dt, side="right") - 1
        inside &= (bt >= 0) & (bt < n_t)
        return np.where(inside, b * n_t + bt, -1)

    c_target = cell(target, dt_target if match_delta_teff else None)
    p = np.bincount(c_target[c_target >= 0], minlength=n_fe * n_t).astype(float)
    p = p / p.sum()

    def propose(n):
        i = ok[rng.choice(ok.size, size=n, p=prob)] if match_star else ok[rng.integers(ok.size, size=n)]
        j = ok[rng.choice(ok.size, size=n, p=prob)] if match_star else ok[rng.integers(ok.size, size=n)]
        keep = i != j
        if max_delta_teff is not None:
            keep &= np.abs(teff[i] - teff[j]) < max_delta_teff
        i, j = i[keep], j[keep]
        return i, j, cell(np.abs(feh[i] - feh[j]), np.abs(teff[i] - teff[j]))

    i0, j0, b0 = propose(batch_size)
    q = np.bincount(b0[b0 >= 0], minlength=n_fe * n_t) / max(b0.size, 1)
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
    i, j, b = i0, j0, b0
    while n_acc < n_pairs and batch < max_batches:
        prob_acc = np.where(b >= 0, w[np.maximum(b, 0)], 0.0)
        acc = rng.random(b.size) < prob_acc
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
            i, j, b = propose(batch_size)
    if n_acc < n_pairs:
        log.warning("field_pairs: only %d of %d pairs after %d batches", n_acc, n_pairs, batch)
    ia, ja = np.asarray(accepted_i, int), np.asarray(accepted_j, int)
    s1 = cat.iloc[ia].add_suffix("_1").reset_index(drop=True)
    s2 = cat.iloc[ja].add_suffix("_2").reset_index(drop=True)
    out = pd.concat([s1, s2], axis=1)
    out["index_1"], out["index_2"] = ia, ja
    log.info("field_pairs: %d pairs, acceptance %.3g", n_acc, n_acc / max(batch * batch_size, 1))
    return _add_deltas(out)


def shuffle_within_bins(table, columns, *, widths=(("teff", 250.0), ("logg", 0.25), ("fe_h", 0.1)),
                        rng=None, seed=None):
    """The null control: ``columns`` permuted among stars of the same (teff, logg, [Fe/H]) bin.

    Each star keeps its own teff, logg and [Fe/H] (and everything else) but receives the
    abundance vector (all ``columns`` together) of a random star of its bin (bins of the given
    ``widths``; stars with a non-finite binning value keep their values). Binaries built from the
    shuffled table share no chemistry beyond what teff, logg and [Fe/H] imply, so a test that
    finds them closer than field pairs is finding an artefact.

    Returns a shuffled copy (DataFrame).
    """
    if rng is None:
        rng = np.random.default_rng(0 if seed is None else seed)
    elif seed is not None:
        raise ValueError("give rng or seed, not both")
    df = _to_frame(table).copy().reset_index(drop=True)
    columns = list(columns)
    missing = [c for c in columns + [c for c, _ in widths] if c not in df.columns]
    if missing:
        raise KeyError(f"table has no columns {missing}")
    keys = []
    ok = np.ones(len(df), bool)
    for col, width in widths:
        v = df[col].to_numpy(float)
        ok &= np.isfinite(v)
        keys.append(np.floor(np.where(np.isfinite(v), v, 0.0) / float(width)).astype(np.int64))
    codes = np.unique(np.column_stack(keys), axis=0, return_inverse=True)[1].ravel()
    codes = np.where(ok, codes, -1)
    idx = np.arange(len(df))
    perm = idx.copy()
    order = np.argsort(codes, kind="stable")
    sc = codes[order]
    starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]])
    ends = np.r_[starts[1:], len(sc)]
    for a, b in zip(starts, ends):
        if sc[a] < 0:
            continue
        members = order[a:b]
        perm[members] = members[rng.permutation(b - a)]
    vals = df[columns].to_numpy()
    df[columns] = vals[perm]
    return df


@dataclass(frozen=True)
class Separation:
    """How well binaries separate from field pairs in chemical distance.

    ``auc``: probability that a random binary is chemically closer than a random field pair
    (the Mann-Whitney U statistic over ``n_binary * n_field``; 0.5 = no separation, 1 = perfect),
    ``auc_err`` its standard error (Hanley & McNeil 1982), ``median_binary``, ``median_field``,
    ``ratio`` (= median_field / median_binary), ``peak_binary``, ``peak_field`` (KDE modes),
    ``mw_pvalue`` (one-sided: binaries closer) and ``ks_pvalue`` (two-sided).
    """

    auc: float
    auc_err: float
    median_binary: float
    median_field: float
    ratio: float
    peak_binary: float
    peak_field: float
    mw_pvalue: float
    ks_pvalue: float
    n_binary: int
    n_field: int


def separation(d_binary, d_field) -> Separation:
    """:class:`Separation` of two samples of chemical distances (NaNs dropped)."""
    from scipy import stats

    b = np.asarray(d_binary, float)
    f = np.asarray(d_field, float)
    b, f = b[np.isfinite(b)], f[np.isfinite(f)]
    if b.size < 2 or f.size < 2:
        raise ValueError(f"need >= 2 binary and field distances, got {b.size} and {f.size}")
    mw = stats.mannwhitneyu(b, f, alternative="less")
    auc = 1.0 - mw.statistic / (b.size * f.size)  # U counts binary > field
    q1 = auc / (2 - auc)
    q2 = 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (b.size - 1) * (q1 - auc**2) + (f.size - 1) * (q2 - auc**2)) / (b.size * f.size)
    mb, mf = float(np.median(b)), float(np.median(f))
    return Separation(auc=float(auc), auc_err=float(np.sqrt(max(var, 0.0))), median_binary=mb,
                      median_field=mf, ratio=mf / mb if mb > 0 else np.nan,
                      peak_binary=kde_peak(b), peak_field=kde_peak(f),
                      mw_pvalue=float(mw.pvalue), ks_pvalue=float(stats.ks_2samp(b, f).pvalue),
                      n_binary=int(b.size), n_field=int(f.size))


def compare_with_field(catalog, binaries, elements, sigma, *, max_delta_teff=MAX_DELTA_TEFF,
                       field=None, n_per_binary=20, seed=0, match_star=("snr_z", "r_est"),
                       match_delta_teff=True, exclude_ids=None, errors=None):
    """Wide binaries against matched field pairs in eq. 6 distance over ``elements``.

    Parameters
    ----------
    catalog : DataFrame of the usable catalogue stars (with the ``match_star`` columns, e.g.
        from :func:`add_astrometry`).
    binaries : EB19-like table of the pairs to judge (e.g. the ``"judge"`` half of
        :func:`binary_split`).
    elements : label columns of the distance (e.g. ``["alpha_fe", ...]`` or the calibrated
        ``["alpha_fe_cal", ...]``); pairs need finite values in all of them.
    sigma : array (K,) or dict: the single-star CV scatter of each element (eq. 6).
    max_delta_teff : the binaries' and field pairs' ``|Delta teff|`` cut (None: no cut).
    field : DataFrame, optional
        Candidate field stars; default the dwarfs of ``catalog`` with finite ``elements``.
    n_per_binary : field pairs per binary.
    exclude_ids : ids left out of the field; default both members of every pair in ``binaries``.
    errors : list of error columns, one per element, optional
        Scale each pair's differences by its own errors (:func:`pair_distance`); pairs need
        finite positive errors too.

    Returns
    -------
    dict with ``pairs``, ``field_pairs`` (tables), ``d_binary``, ``d_field`` (arrays) and
    ``separation`` (:class:`Separation`).
    """
    elements = list(elements)
    cat = _to_frame(catalog)
    bins = _to_frame(binaries)
    pairs = binary_pairs(cat, bins, max_delta_teff=max_delta_teff)
    needed = elements + (list(errors) if errors is not None else [])
    cols = [f"{e}_{k}" for e in needed for k in (1, 2)]
    pairs = pairs[np.isfinite(pairs[cols].to_numpy(float)).all(axis=1)].reset_index(drop=True)
    if len(pairs) < 2:
        raise ValueError(f"only {len(pairs)} binaries with finite {needed}")
    if field is None:
        field = cat[is_dwarf(cat) & np.isfinite(cat[needed].to_numpy(float)).all(axis=1)]
    if exclude_ids is None:
        exclude_ids = np.concatenate([bins["source_id1"], bins["source_id2"]])
    matched = field_pairs(field, pairs, n_pairs=n_per_binary * len(pairs), seed=seed,
                          max_delta_teff=max_delta_teff, exclude_ids=exclude_ids,
                          match_star=match_star, match_delta_teff=match_delta_teff)
    s = _sigma_vector(sigma, elements)
    d_b = pair_distance(pairs, elements, s, errors=errors)
    d_f = pair_distance(matched, elements, s, errors=errors)
    return {"pairs": pairs, "field_pairs": matched, "d_binary": d_b, "d_field": d_f,
            "separation": separation(d_b, d_f)}


# ----------------------------------------------------------------------------- summaries
def kde_peak(values, *, grid=None, bw_method=None):
    """Mode of a Gaussian KDE (scipy, Scott's rule by default) of the finite ``values``.

    ``grid`` defaults to 2000 points on ``[0, max(values)]`` (distances are non-negative). NaN
    for fewer than two finite values; the value itself when they are all equal."""
    from scipy.stats import gaussian_kde

    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return np.nan
    if np.ptp(v) == 0.0:  # every value the same (a KDE has no bandwidth): that value is the mode
        return float(v[0])
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


def calibration_comparison(catalog, binaries_table, elements, sigma, *, suffix="_cal", seed=0,
                           max_delta_teff=MAX_DELTA_TEFF, null=True, errors=False, **kwargs):
    """Binaries against matched field pairs, raw and calibrated, with and without the teff cut.

    Runs :func:`compare_with_field` for the four cases (``elements`` or ``<element><suffix>``;
    ``max_delta_teff`` or no cut), each with its null control (:func:`shuffle_within_bins` of
    the same columns, same seed). Pass the binaries that judge (the ``"judge"`` half of
    :func:`binary_split`), never those that calibrated. ``errors=True`` scales each pair's
    differences by its stars' own errors (``e_<element>`` and ``e_<element><suffix>``,
    :func:`pair_distance`) instead of by ``sigma``; the null control shuffles the errors with
    the values.

    Returns
    -------
    summary : DataFrame, one row per case: ``values`` (raw|calibrated), ``cut`` (the Delta teff
        cut or NaN), ``n_binary``, ``n_field``, ``auc``, ``auc_err``, ``median_binary``,
        ``median_field``, ``ratio``, ``mw_pvalue`` and ``null_auc``, ``null_auc_err``,
        ``null_ratio``, ``null_mw_pvalue``.
    results : dict ``{(values, cut): result}`` (:func:`compare_with_field`, with ``"null"``).
    """
    import pandas as pd

    elements = list(elements)
    rows, results = [], {}
    for values, cols in (("raw", elements), ("calibrated", [f"{e}{suffix}" for e in elements])):
        ecols = [f"e_{c}" for c in cols] if errors else None
        shuffled = shuffle_within_bins(catalog, cols + (ecols or []), seed=seed) if null else None
        for cut in (max_delta_teff, None):
            res = compare_with_field(catalog, binaries_table, cols, sigma, max_delta_teff=cut,
                                     seed=seed, errors=ecols, **kwargs)
            sep = res["separation"]
            row = dict(values=values, cut=np.nan if cut is None else float(cut),
                       n_binary=sep.n_binary, n_field=sep.n_field, auc=sep.auc,
                       auc_err=sep.auc_err, median_binary=sep.median_binary,
                       median_field=sep.median_field, ratio=sep.ratio, mw_pvalue=sep.mw_pvalue)
            if null:
                res["null"] = compare_with_field(shuffled, binaries_table, cols, sigma,
                                                 max_delta_teff=cut, seed=seed, errors=ecols,
                                                 **kwargs)
                ns = res["null"]["separation"]
                row.update(null_auc=ns.auc, null_auc_err=ns.auc_err, null_ratio=ns.ratio,
                           null_mw_pvalue=ns.mw_pvalue)
            rows.append(row)
            results[(values, cut)] = res
    return pd.DataFrame(rows), results


def growth_gain_error(binaries_pairs, field, elements, sigma, *, n_boot=200, seed=0):
    """Bootstrap standard error of the growth of the separation as elements are added.

    The statistic is :func:`separation_growth`'s ``difference`` (median field minus median
    binary distance) with all ``elements`` minus that with the first one; binaries and field
    pairs are resampled with replacement ``n_boot`` times. Returns ``(value, standard error)``.
    """
    elements = list(elements)
    s = _sigma_vector(sigma, elements)
    b = _to_frame(binaries_pairs).reset_index(drop=True)
    f = _to_frame(field).reset_index(drop=True)
    full_b, one_b = pair_distance(b, elements, s), pair_distance(b, elements[:1], s[:1])
    full_f, one_f = pair_distance(f, elements, s), pair_distance(f, elements[:1], s[:1])

    def stat(ib, jf):
        return ((np.nanmedian(full_f[jf]) - np.nanmedian(full_b[ib]))
                - (np.nanmedian(one_f[jf]) - np.nanmedian(one_b[ib])))

    rng = np.random.default_rng(seed)
    value = stat(np.arange(len(b)), np.arange(len(f)))
    boots = [stat(rng.integers(len(b), size=len(b)), rng.integers(len(f), size=len(f)))
             for _ in range(n_boot)]
    return float(value), float(np.std(boots, ddof=1))
