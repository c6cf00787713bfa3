"""Wide binaries without the teff cut: how far a calibration of the catalogue could go (mock only).

A study run by hand, not a benchmark (``make bench`` runs only ``bench_*.py``). It needs a mock
whose notebooks 01-05 have run (``LAMOSTCANNON_DATA``, ``LAMOSTCANNON_SIZE``). Notebook 06 asks
that the calibrated dwarf abundances separate wide binaries from matched field pairs without the
Delta-teff cut at least as well as the raw ones do with it. This study asks whether a better
calibration could get there, by giving one the mock's truth, which no real calibration has.
Per dwarf abundance with CV skill it forms:

* ``raw`` and ``calibrated``: the catalogue's ``<x>`` and ``<x>_cal``;
* ``oracle_observables``: ``<x>`` less the mean error (inferred minus true) of field dwarfs with
  the same teff, logg and S/N. The mean is a gradient-boosted regression of the error on those
  three observables, fitted with the truth to dwarfs in no judging binary and in no cluster. It is
  the best additive correction a function of the observables can make on average over the field;
* ``oracle_observables_feh``: the same with [Fe/H] among the observables;
* ``oracle_response``: the truth-given version of notebook 05's gain: in bins of teff (200 K)
  and S/N (quartiles), the least-squares line of the inferred on the true abundance over the
  same field dwarfs, ``a + b x``, inverted: ``(<x> - a) / b``. It undoes the compression of
  each abundance the only way a calibration can, by dividing the noise by ``b`` as well;
* ``oracle_own_abundance``: ``oracle_observables_feh`` with the star's true value of the
  abundance itself added.
  It also removes the error that depends on that value (a model that compresses each abundance
  towards the training mean by a factor that changes with teff), which no calibration in the
  observables can know;
* ``oracle_chemistry``: the same with all the star's true abundances, which removes as well the
  errors that one abundance causes in another.

It also reports the catalogue's compression: for the dwarfs, the least-squares slope of each raw
abundance on its true value in bins of S/N and of teff (``response``; 1 where the model follows
the true abundance, less where it compresses it).

For each: the AUC of the judging half of the wide binaries against field pairs matched in S/N,
distance, Delta teff and Delta [Fe/H] (:func:`lamostcannon.binaries.compare_with_field`, eq. 6
with notebook 04's CV scatter, as notebook 06), with the cut and without, and held-out
Praesepe's slope of each abundance with teff. Results:
``benchmarks/results/binary_ceiling_<size>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESPONSE_SNR = (0, 20, 40, 80, 160, np.inf)
RESPONSE_TEFF = (3500, 4500, 5000, 5500, 6000, 7000)
VARIANTS = {"oracle_observables": ("teff", "logg", "ln_snr"),
            "oracle_observables_feh": ("teff", "logg", "ln_snr", "fe_h"),
            "oracle_response": ("<response in teff and S/N bins>",),
            "oracle_own_abundance": ("teff", "logg", "ln_snr", "fe_h", "<true abundance>"),
            "oracle_chemistry": ("teff", "logg", "ln_snr", "fe_h", "<true abundances>")}


def _mean_error(features, error, fit_rows, seed):
    """Gradient-boosted mean of ``error`` given ``features``, fitted on ``fit_rows`` (NaN-safe)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    ok = fit_rows & np.isfinite(error) & np.isfinite(features).all(axis=1)
    reg = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, min_samples_leaf=100,
                                        early_stopping=True, validation_fraction=0.2,
                                        random_state=seed)
    reg.fit(features[ok], error[ok])
    out = np.full(len(error), np.nan)
    have = np.isfinite(features).all(axis=1)
    out[have] = reg.predict(features[have])
    return out


def _inverted_response(inferred, true, bins, fit_rows, min_stars=50, min_slope=0.2):
    """``(inferred - a) / b`` with ``a + b * true`` the least-squares line of ``inferred`` on
    ``true`` over the ``fit_rows`` of each bin (NaN in bins with fewer than ``min_stars``)."""
    out = np.full(len(inferred), np.nan)
    ok = fit_rows & np.isfinite(inferred) & np.isfinite(true)
    for b in np.unique(bins):
        sel = ok & (bins == b)
        if sel.sum() < min_stars:
            continue
        slope, intercept = np.polyfit(true[sel], inferred[sel], 1)
        rows = bins == b
        out[rows] = (inferred[rows] - intercept) / max(slope, min_slope)
    return out


def _response(frame, by, edges, elements, min_stars=50):
    """{bin: {element: slope of the raw on the true abundance}} in bins of column ``by``."""
    import pandas as pd

    out = {}
    for interval, g in frame.groupby(pd.cut(frame[by], edges), observed=True):
        slopes = {}
        for e in elements:
            ok = np.isfinite(g[e].to_numpy(float)) & np.isfinite(g[f"{e}_true"].to_numpy(float))
            if ok.sum() >= min_stars:
                slopes[e] = float(np.polyfit(g[f"{e}_true"].to_numpy(float)[ok],
                                             g[e].to_numpy(float)[ok], 1)[0])
        out[str(interval)] = slopes
    return out


def study(seed: int = 1) -> dict:
    sys.path.insert(0, str(ROOT))
    import pandas as pd
    from astropy.table import Table

    from lamostcannon import binaries, calibration, maps, paths, validation
    from lamostcannon.config import settings

    t0 = time.perf_counter()
    raw = paths.raw_dir("mock")
    catalog = pd.read_parquet(paths.processed_dir() / "catalog.parquet")
    catalog = catalog[maps.quality_mask(catalog)].reset_index(drop=True)
    elements = validation.skilled_labels("dwarf", calibration.DWARF_ABUNDANCES)
    sigma = validation.cv_metrics(validation.read_cv(validation.cv_path("dwarf"))).loc[
        elements, "scatter"].to_numpy()
    catalog = binaries.add_astrometry(catalog, Table.read(raw / "gaia" / "gaia_source.fits"),
                                      Table.read(raw / "gaia" / "distances.fits"))
    truth = Table.read(raw / "truth" / "truth.fits")
    catalog = catalog.merge(calibration.true_labels(truth, elements), on="designation", how="left",
                            suffixes=("", "_true"))
    wide = Table.read(raw / "binaries" / "wide_binaries.fits").to_pandas()
    judge = wide[binaries.binary_split(wide) == "judge"]
    members = Table.read(raw / "clusters" / "members.fits").to_pandas()
    praesepe = binaries.cluster_members(catalog, members, binaries.PRAESEPE, min_proba=0.7,
                                        dwarfs_only=True)["source_id"]

    dwarf = np.asarray(binaries.is_dwarf(catalog), bool)
    fit_rows = dwarf & ~catalog["source_id"].isin(
        np.concatenate([judge["source_id1"], judge["source_id2"], members["source_id"]])).to_numpy()
    catalog["ln_snr"] = np.log(catalog["snr_z"].clip(lower=1.0))
    true_cols = [f"{e}_true" for e in elements]
    variants = {"raw": "", "calibrated": "_cal"}
    for variant, feats in VARIANTS.items():
        if feats == VARIANTS["oracle_response"]:
            ln_snr = catalog["ln_snr"].to_numpy(float)
            edges = np.nanquantile(ln_snr[dwarf], [0.25, 0.5, 0.75])
            bins = (np.floor(catalog["teff"].to_numpy(float) / 200.0) * 10
                    + np.digitize(ln_snr, edges))
            for name in elements:
                catalog[f"{name}_{variant}"] = _inverted_response(
                    catalog[name].to_numpy(float), catalog[f"{name}_true"].to_numpy(float), bins,
                    fit_rows)
            variants[variant] = f"_{variant}"
            continue
        cols = [f for f in feats if not f.startswith("<")]
        if "<true abundances>" in feats:
            cols += true_cols
        for name in elements:
            own = [f"{name}_true"] if "<true abundance>" in feats else []
            x = catalog[cols + own].to_numpy(float)
            inferred = catalog[name].to_numpy(float)
            error = inferred - catalog[f"{name}_true"].to_numpy(float)
            catalog[f"{name}_{variant}"] = inferred - _mean_error(x, error, fit_rows, seed)
        variants[variant] = f"_{variant}"

    # as notebook 06: Fig 9 leaves out values beyond the KDE boundary or clipped (raw, calibrated
    # and the oracles made from the raw); Praesepe (Fig 17) keeps every value
    fig9, _ = maps.mask_extrapolated(catalog, elements)
    for name in elements:
        beyond = fig9[f"{name}_extrap"].to_numpy(bool)
        for suffix in list(variants.values())[1:]:
            fig9.loc[beyond, f"{name}{suffix}"] = np.nan
    out = {"elements": elements, "n_dwarfs": int(dwarf.sum()), "n_fit": int(fit_rows.sum()),
           "cut": binaries.MAX_DELTA_TEFF, "variants": {}, "response": {}}
    for by, edges in (("snr_z", RESPONSE_SNR), ("teff", RESPONSE_TEFF)):
        out["response"][by] = _response(catalog[dwarf], by, edges, elements)
    members_p = catalog[catalog["source_id"].isin(praesepe)]
    for variant, suffix in variants.items():
        cols = [f"{e}{suffix}" for e in elements]
        res = {}
        for key, cut in (("cut", binaries.MAX_DELTA_TEFF), ("no_cut", None)):
            sep = binaries.compare_with_field(fig9, judge, cols, sigma, max_delta_teff=cut,
                                              seed=settings().seed)["separation"]
            res[f"auc_{key}"], res[f"auc_err_{key}"] = float(sep.auc), float(sep.auc_err)
            res[f"n_binary_{key}"] = int(sep.n_binary)
        res["praesepe_slope"], res["praesepe_slope_err"] = {}, {}
        for e, c in zip(elements, cols):
            trend = binaries.teff_trend(members_p["teff"].to_numpy(float),
                                        members_p[c].to_numpy(float))
            res["praesepe_slope"][e] = float(trend.slope_per_1000K)
            res["praesepe_slope_err"][e] = float(trend.slope_err * 1000.0)
        out["variants"][variant] = res
    out.update(n_praesepe=len(members_p), seconds=round(time.perf_counter() - t0, 1))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output", type=Path)
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from lamostcannon.config import settings

    res = study(a.seed)
    path = a.output or ROOT / "benchmarks" / "results" / f"binary_ceiling_{settings().size}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(f"{res['n_dwarfs']} dwarfs, {res['n_fit']} fit the oracles; "
          f"{res['n_praesepe']} Praesepe dwarfs")
    for variant, r in res["variants"].items():
        print(f"{variant:24s} AUC with the cut {r['auc_cut']:.3f} +- {r['auc_err_cut']:.3f} "
              f"({r['n_binary_cut']}), without {r['auc_no_cut']:.3f} +- {r['auc_err_no_cut']:.3f} "
              f"({r['n_binary_no_cut']}); Praesepe slopes: "
              + ", ".join(f"{e} {s:+.3f}" for e, s in r["praesepe_slope"].items()))
    for by, bins in res["response"].items():
        print(f"response (slope of raw on true) by {by}:")
        for b, slopes in bins.items():
            print(f"  {b:>18s} " + ", ".join(f"{e} {v:.2f}" for e, v in slopes.items()))
    print(f"-> {path} ({res['seconds']} s)")


if __name__ == "__main__":
    main()
