"""How many Newton starts the test step needs: wrong basins, cost and the MULTIPLE_MINIMA rule.

A study run by hand, not a benchmark (``make bench`` runs only ``bench_*.py``). It needs a mock
whose notebooks 01-05 have run (``LAMOSTCANNON_DATA``, ``LAMOSTCANNON_SIZE``): notebook 03's
models, the survey's spectra store and the per-observation table. For each model it labels
``--n`` random survey observations of that model with ``n_starts`` = 2, 4, 8 and 16
(:meth:`lamostcannon.cannon.CannonModel.test`, one BLAS thread) and reports:

* ``worse_than_16``: the fraction of fits whose chi2 exceeds the one 16 starts reach by more
  than 1 (the fit stopped in a shallower basin);
* ``cpu_ms``: CPU time per spectrum of the test step (``time.process_time``, fastest of
  ``--repeat`` runs);
* ``multiple_minima``: the fraction flagged ``MULTIPLE_MINIMA`` with the package's rule
  (another minimum more than :data:`lamostcannon.cannon.MULTIPLE_MINIMA_SIGMA` formal errors
  away) and with every distinct minimum counted (``MULTIPLE_MINIMA_SIGMA = 0``, the rule
  before session 11).

With the mock's truth it also labels the model's own spectra: ``model.predict`` at the true
labels of ``--n-self`` observations with S/N > 100, plus Gaussian noise from their inverse
variances. There the right answer is known, so it reports the fraction more than 300 K from the
true teff, and at the largest number of starts each label's slope of fitted on true values and
rms. Results: ``benchmarks/results/newton_starts_<size>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STARTS = (2, 4, 8, 16)


def _spectra(store, obsids):
    rows = store.rows_for(np.asarray(obsids, dtype=np.int64))
    have = rows >= 0
    flux, ivar = store.read(rows[have])
    return have, np.asarray(flux), np.asarray(ivar)


def _fit(model, flux, ivar, n_starts, repeat):
    """(result, fastest CPU seconds) of ``repeat`` identical test steps."""
    best, result = np.inf, None
    for _ in range(repeat):
        t0 = time.process_time()
        result = model.test(flux, ivar, n_starts=n_starts)
        best = min(best, time.process_time() - t0)
    return result, best


def _true_labels(obs, names):
    """The mock's true labels of ``obs`` in the model's label order (NaN where unknown)."""
    import pandas as pd
    from astropy.table import Table

    from lamostcannon import calibration, paths

    path = paths.raw_dir("mock") / "truth" / "truth.fits"
    if not path.exists():
        return None
    truth = Table.read(path)
    t = truth.to_pandas()
    t["designation"] = t["designation"].astype(str).str.strip()
    t = t[t["designation"] != ""].drop_duplicates("designation")
    ratios = [n for n in names if n.endswith("_fe") and n != "fe_h"]
    true = t[["designation", "teff", "logg", "vmic", "fe_h"]].merge(
        calibration.true_labels(truth, ratios), on="designation")
    j = pd.DataFrame({"designation": obs["designation"].astype(str).str.strip()}).merge(
        true, on="designation", how="left")
    return np.column_stack([j[n].to_numpy(float) for n in names])


def study(n: int = 4000, n_self: int = 1500, seed: int = 2, repeat: int = 2) -> dict:
    sys.path.insert(0, str(ROOT))
    import pandas as pd
    from threadpoolctl import threadpool_limits

    from lamostcannon import cannon, paths
    from lamostcannon.spectra import SpectraStore

    obs_all = pd.read_parquet(paths.processed_dir() / "labels_per_observation.parquet",
                              columns=["obsid", "designation", "giantmodel", "snr_z"])
    out = {"starts": list(STARTS), "multiple_minima_sigma": cannon.MULTIPLE_MINIMA_SIGMA,
           "groups": {}}
    rng = np.random.default_rng(seed)
    with SpectraStore.open(paths.interim_dir() / "survey_spectra.zarr", "r") as store, \
            threadpool_limits(1):
        for group in ("dwarf", "giant"):
            model = cannon.CannonModel.read(paths.processed_dir() / f"model_{group}.fits")
            obs = obs_all[obs_all["giantmodel"].astype(bool) == (group == "giant")]
            pick = obs.sample(n=min(n, len(obs)), random_state=seed)
            have, flux, ivar = _spectra(store, pick["obsid"])
            model.test(flux[:600], ivar[:600])          # load the compiled kernels first
            res = {"n": int(have.sum()), "worse_than_16": {}, "cpu_ms": {},
                   "multiple_minima": {}, "multiple_minima_any": {}}
            fits = {}
            for ns in STARTS:
                fits[ns], cpu = _fit(model, flux, ivar, ns, repeat)
                res["cpu_ms"][ns] = 1000.0 * cpu / len(flux)
                res["multiple_minima"][ns] = float(np.mean(
                    (fits[ns].flag & cannon.FLAG_MULTIPLE_MINIMA) > 0))
                rule = cannon.MULTIPLE_MINIMA_SIGMA
                try:
                    cannon.MULTIPLE_MINIMA_SIGMA = 0.0
                    any_min = model.test(flux, ivar, n_starts=ns).flag
                finally:
                    cannon.MULTIPLE_MINIMA_SIGMA = rule
                res["multiple_minima_any"][ns] = float(np.mean(
                    (any_min & cannon.FLAG_MULTIPLE_MINIMA) > 0))
            deepest = fits[STARTS[-1]].chi2
            for ns in STARTS:
                res["worse_than_16"][ns] = float(np.mean(fits[ns].chi2 - deepest > 1.0))

            names = list(model.label_names)
            bright = obs[obs["snr_z"] > 100]
            bright = bright.sample(n=min(n_self, len(bright)), random_state=seed)
            true = _true_labels(bright, names)
            if true is not None:
                have, _, ivar_b = _spectra(store, bright["obsid"])
                true = true[have]
                ok = np.isfinite(true).all(axis=1)
                true, ivar_b = true[ok], ivar_b[ok]
                sigma = np.where(ivar_b > 0, 1.0 / np.sqrt(np.where(ivar_b > 0, ivar_b, 1.0)), 0.0)
                own = model.predict(true) + rng.standard_normal(sigma.shape) * sigma
                self_fit = {"n": int(len(true)), "teff_off_300K": {}}
                for ns in STARTS[:-1]:
                    got = model.test(own, ivar_b, n_starts=ns).labels
                    self_fit["teff_off_300K"][ns] = float(np.mean(np.abs(got[:, 0] - true[:, 0])
                                                                  > 300.0))
                self_fit["slope"] = {m: float(np.polyfit(true[:, k], got[:, k], 1)[0])
                                     for k, m in enumerate(names)}
                self_fit["rms"] = {m: float(np.sqrt(np.mean((got[:, k] - true[:, k]) ** 2)))
                                   for k, m in enumerate(names)}
                res["model_spectra"] = self_fit
            out["groups"][group] = res
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4000, help="survey observations per model")
    p.add_argument("--n-self", type=int, default=1500, help="model spectra per model (mock)")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="timed runs per number of starts")
    p.add_argument("--output", type=Path)
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from lamostcannon.config import settings

    res = study(a.n, a.n_self, a.seed, a.repeat)
    path = a.output or ROOT / "benchmarks" / "results" / f"newton_starts_{settings().size}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    for group, r in res["groups"].items():
        print(f"{group} ({r['n']} observations):")
        for ns in res["starts"]:
            print(f"  {ns:2d} starts: worse than 16 by chi2 > 1 {r['worse_than_16'][ns]:.2%}, "
                  f"{r['cpu_ms'][ns]:.3f} ms CPU, MULTIPLE_MINIMA {r['multiple_minima'][ns]:.2%} "
                  f"(every distinct minimum: {r['multiple_minima_any'][ns]:.2%})")
        if "model_spectra" in r:
            s = r["model_spectra"]
            print(f"  model's own spectra ({s['n']}, S/N > 100): > 300 K off in teff "
                  + ", ".join(f"{v:.1%} from {k}" for k, v in s["teff_off_300K"].items())
                  + "; slopes " + ", ".join(f"{m} {v:.2f}" for m, v in s["slope"].items()))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
