"""Label noise in the training set: does a model trained on more reference stars do better?

A study run by hand, not a benchmark (``make bench`` runs only ``bench_*.py``). It needs a mock
whose notebooks 01-02 have run (``LAMOSTCANNON_DATA``, ``LAMOSTCANNON_SIZE``): the reference set,
its spectra and the mock truth. For one model group it holds out ``--test`` reference stars, trains
the group's Cannon on growing subsets of the others with three kinds of training labels, labels
the held-out spectra, and reports the scatter of the inferred labels about the *true* ones and the
slope of inferred on true:

* ``galah``: the reference set's GALAH-like labels (what notebook 03 trains on);
* ``iid``: the true labels plus independent Gaussian noise with, per label, the standard deviation
  of GALAH-like minus true over the training stars (label noise without any structure);
* ``true``: the true labels;
* ``galah_eiv``, ``iid_eiv``: the same labels with their errors (the reference set's
  ``e_<label>``; the noise's standard deviation for ``iid``) given to
  :meth:`~lamostcannon.cannon.CannonModel.train` (``label_errors``), which fits the model to the
  labels' regression calibration (:func:`~lamostcannon.cannon.regression_calibrate`).

On the ``large`` mock (2026-11-30, giants) the GALAH-like and ``iid`` columns get *worse* with more
training stars while ``true`` gets better: regression dilution (the model learns derivatives
attenuated by the label noise and reports labels stretched away from the mean; with few training
stars the coefficients' own noise shrinks them back). With the errors given (``*_eiv``) the giants'
teff, logg and [O/Fe] no longer get worse with more stars (7,200 giants: teff 115 -> 59 K); the
dwarfs' logg and [O/Fe] improve but their teff gets three times worse (``--group dwarf``: 64 ->
216 K), because the regression calibration ties their noisy logg to teff. Results:
``benchmarks/results/label_noise.json`` (``--output`` for another file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "label_noise.json"


def study(group: str = "giant", sizes=(800, 3000, None), n_test: int = 1000, seed: int = 1,
          n_show: int = 5, kinds=None) -> dict:
    """Scatter and slope against the truth of held-out labels, per training size and label kind."""
    sys.path.insert(0, str(ROOT))
    from astropy.table import Table

    from lamostcannon import cleaning, labels, paths
    from lamostcannon.cannon import CannonModel

    giant = group == "giant"
    reference = cleaning.read_reference_set()
    truth = Table.read(paths.raw_dir("mock") / "truth" / "truth.fits")
    true_ref = cleaning.with_true_labels(reference, truth)
    table, flux, ivar, wave = cleaning.load_training_set(giant, reference)
    names = list(labels.model_labels(giant))
    in_group = true_ref[np.asarray(reference["giant"]) == giant]
    row = {int(k): i for i, k in enumerate(np.asarray(in_group["sobject_id"]))}
    idx = np.array([row[int(k)] for k in np.asarray(table["sobject_id"])])
    true = np.column_stack([np.asarray(in_group[n], float)[idx] for n in names])
    galah = np.column_stack([np.asarray(table[n], float) for n in names])
    if len(table) <= n_test + 100:
        raise ValueError(f"{len(table)} {group} reference stars: too few for {n_test} held out")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(table))
    test, pool = order[:n_test], order[n_test:]
    noise_sd = np.std(galah[pool] - true[pool], axis=0)
    iid = true + np.random.default_rng(seed + 1).normal(0.0, noise_sd, true.shape)
    # the errors an errors-in-variables fit is given: the reference set's own e_<label> for the
    # GALAH-like labels (0 where it has none), the noise's known sd for iid
    galah_err = np.column_stack([np.asarray(table[f"e_{n}"], float) if f"e_{n}" in table.colnames
                                 else np.zeros(len(table)) for n in names])
    iid_err = np.broadcast_to(noise_sd, true.shape)
    out = {"group": group, "n_reference": int(len(table)), "n_test": int(n_test),
           "labels": names[:n_show], "label_noise_sd": dict(zip(names, noise_sd.round(4).tolist())),
           "runs": []}
    for size in sizes:
        train = pool if size is None or size >= pool.size else pool[:size]
        for kind, lab, err in (("galah", galah, None), ("galah_eiv", galah, galah_err),
                               ("iid", iid, None), ("iid_eiv", iid, iid_err), ("true", true, None)):
            if kinds and kind not in kinds:
                continue
            t0 = time.perf_counter()
            model = CannonModel(names, wavelength=wave).train(
                lab[train], flux[train], ivar[train],
                label_errors=None if err is None else err[train])
            got = model.test(flux[test], ivar[test]).labels
            run = {"n_train": int(train.size), "labels_from": kind,
                   "seconds": round(time.perf_counter() - t0, 1)}
            for j, name in enumerate(names[:n_show]):
                ok = np.isfinite(got[:, j])
                d = got[ok, j] - true[test][ok, j]
                run[f"scatter_{name}"] = round(float(np.std(d)), 4)
                run[f"slope_{name}"] = round(float(np.polyfit(true[test][ok, j], got[ok, j], 1)[0]), 3)
            out["runs"].append(run)
            print(json.dumps(run), flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", choices=("dwarf", "giant"), default="giant")
    ap.add_argument("--sizes", type=int, nargs="+", default=[800, 3000, 0],
                    help="training-set sizes; 0 = every star not held out")
    ap.add_argument("--test", type=int, default=1000, help="held-out reference stars")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kinds", nargs="+", default=None,
                    help="label kinds to train on (default all: galah galah_eiv iid iid_eiv true)")
    ap.add_argument("--output", type=Path, default=RESULT)
    args = ap.parse_args(argv)
    res = study(args.group, [s or None for s in args.sizes], args.test, args.seed,
                kinds=args.kinds)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.output}")
    return res


if __name__ == "__main__":
    main()
