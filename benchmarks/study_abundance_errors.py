"""Errors in the abundance labels: what fitting a model to their regression calibration changes.

A study run by hand, not a benchmark (``make bench`` runs only ``bench_*.py``). It needs a mock
whose notebooks 01-05 have run (``LAMOSTCANNON_DATA``, ``LAMOSTCANNON_SIZE``): the reference set
and its spectra, the survey's spectra store, the cluster members and the mock truth. For one
model group it trains three Cannons on the same reference stars:

* ``given``: GALAH's labels as given (the paper's training);
* ``abundances``: the ``[X/Fe]`` labels' errors given to
  :meth:`~lamostcannon.cannon.CannonModel.train` (:func:`lamostcannon.cleaning.training_label_errors`,
  how notebook 03 trains the dwarf model), so the model is fitted to their regression calibration;
* ``truth``: the same stars' true labels (the mock's truth; what no training label can beat).

All three label ``--n-field`` survey observations of the group that are neither reference stars
nor cluster members (drawn with ``--seed``) and every member observation (Cantat-Gaudin ``proba``
>= 0.7) of the group. Reported, per model: each label's rms about the truth and the slope of
inferred on true over the field observations, and over those with S/N above ``RESPONSE_SNR``
alone (the compression where noise matters least); each cluster's slope of every abundance with
the inferred teff (dex per 1000 K); for the clusters other than Praesepe, the rms of those slopes
about their mean (how well one cluster's trend predicts another's: what a calibration fitted on
some clusters can remove from the rest); and the largest linear coefficient of each label
(normalised flux per training standard deviation). Results:
``benchmarks/results/abundance_errors_<group>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PRAESEPE = "NGC_2632"
RESPONSE_SNR = 80.0


def _spectra(store, obsids):
    rows = store.rows_for(np.asarray(obsids, dtype=np.int64))
    have = rows >= 0
    flux, ivar = store.read(rows[have])
    return have, np.asarray(flux), np.asarray(ivar)


def study(group: str = "dwarf", n_field: int = 3000, seed: int = 1) -> dict:
    sys.path.insert(0, str(ROOT))
    import pandas as pd
    from astropy.table import Table

    from lamostcannon import binaries, calibration, cleaning, labels, paths
    from lamostcannon.cannon import CannonModel
    from lamostcannon.spectra import SpectraStore

    giant = group == "giant"
    reference = cleaning.read_reference_set()
    table, flux, ivar, wave = cleaning.load_training_set(giant, reference)
    names = list(labels.model_labels(giant))
    abundances = [n for n in names if n.endswith("_fe") and n != "fe_h"]
    truth = Table.read(paths.raw_dir("mock") / "truth" / "truth.fits").to_pandas()
    truth["designation"] = truth["designation"].astype(str).str.strip()
    truth = truth[truth["in_lamost"] & (truth["designation"] != "")].drop_duplicates("designation")
    true = truth[["designation", "source_id", "teff", "logg", "vmic", "fe_h"]].merge(
        calibration.true_labels(truth, abundances, reference=reference), on="designation")
    train_true = pd.DataFrame({"designation": np.asarray(table["designation"]).astype(str)}).merge(
        true, on="designation", how="left")[names].to_numpy(float)
    if not np.isfinite(train_true).all():
        raise ValueError("some training stars have no true labels in the mock's truth table")

    t0 = time.perf_counter()
    models = {"given": CannonModel(names, wavelength=wave).train(table, flux, ivar),
              "abundances": CannonModel(names, wavelength=wave).train(
                  table, flux, ivar, label_errors=cleaning.training_label_errors(table, names)),
              "truth": CannonModel(names, wavelength=wave).train(train_true, flux, ivar)}
    train_s = time.perf_counter() - t0

    obs = pd.read_parquet(paths.processed_dir() / "labels_per_observation.parquet",
                          columns=["obsid", "designation", "giantmodel", "snr_z"])
    obs["designation"] = obs["designation"].astype(str).str.strip()
    obs = obs[obs["giantmodel"].astype(bool) == giant].merge(true, on="designation")
    members = Table.read(paths.raw_dir("mock") / "clusters" / "members.fits").to_pandas()
    members["cluster"] = members["cluster"].astype(str).str.strip()
    members = members[members["proba"] >= 0.7]
    in_cluster = obs["source_id"].isin(members["source_id"])
    field = obs[~in_cluster & ~obs["designation"].isin(np.asarray(reference["designation"]).astype(str))]
    field = field.sample(n=min(n_field, len(field)), random_state=seed)
    member_obs = obs[in_cluster].merge(members[["source_id", "cluster"]], on="source_id")

    out = {"group": group, "n_train": len(table), "train_seconds": round(train_s, 1), "models": {}}
    with SpectraStore.open(paths.interim_dir() / "survey_spectra.zarr", "r") as store:
        have_f, ff, fi = _spectra(store, field["obsid"])
        have_m, mf, mi = _spectra(store, member_obs["obsid"])
    field, member_obs = field[have_f], member_obs[have_m]
    for kind, model in models.items():
        got_f = model.test(ff, fi).labels
        got_m = model.test(mf, mi).labels
        res = {"field_rms": {}, "field_response": {}, "field_response_high_snr": {},
               "cluster_slopes": {}, "max_linear_theta": {}}
        bright = field["snr_z"].to_numpy(float) > RESPONSE_SNR
        for k, n in enumerate(names):
            t, y = field[n].to_numpy(float), got_f[:, k]
            ok = np.isfinite(t) & np.isfinite(y)
            res["field_rms"][n] = float(np.sqrt(np.mean((y[ok] - t[ok]) ** 2)))
            res["field_response"][n] = float(np.polyfit(t[ok], y[ok], 1)[0])
            hi = ok & bright
            res["field_response_high_snr"][n] = float(np.polyfit(t[hi], y[hi], 1)[0])
            res["max_linear_theta"][n] = float(np.nanmax(np.abs(model.theta[model.pixel_ok, k + 1])))
        teff = got_m[:, names.index("teff")]
        for cluster in sorted(member_obs["cluster"].unique()):
            sel = (member_obs["cluster"] == cluster).to_numpy()
            if sel.sum() < 30:
                continue
            res["cluster_slopes"][cluster] = {
                n: float(binaries.teff_trend(teff[sel], got_m[sel, names.index(n)]).slope_per_1000K)
                for n in abundances}
        others = [c for c in res["cluster_slopes"] if c != PRAESEPE]
        res["other_clusters_slope_rms"] = {
            n: float(np.std([res["cluster_slopes"][c][n] for c in others], ddof=1))
            for n in abundances} if len(others) >= 2 else {}
        out["models"][kind] = res
    out.update(n_field=len(field),
               n_field_high_snr=int(np.sum(field["snr_z"].to_numpy(float) > RESPONSE_SNR)),
               n_member_observations=len(member_obs))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group", choices=("dwarf", "giant"), default="dwarf")
    p.add_argument("--n-field", type=int, default=3000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output", type=Path)
    a = p.parse_args(argv)
    res = study(a.group, a.n_field, a.seed)
    path = a.output or ROOT / "benchmarks" / "results" / f"abundance_errors_{a.group}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    for kind, r in res["models"].items():
        print(f"{kind:10s} field rms: " + ", ".join(f"{n} {v:.3f}" for n, v in r["field_rms"].items()))
        print(f"{'':10s} slope on true, S/N > {RESPONSE_SNR:g}: "
              + ", ".join(f"{n} {v:.2f}" for n, v in r["field_response_high_snr"].items()))
        print(f"{'':10s} other clusters' slope rms: "
              + ", ".join(f"{n} {v:.3f}" for n, v in r["other_clusters_slope_rms"].items()))
        print(f"{'':10s} largest linear theta: "
              + ", ".join(f"{n} {v:.2f}" for n, v in r["max_linear_theta"].items()))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
