"""Tests of ``python -m lamostcannon label`` (lamostcannon.cli) on real LAMOST files.

A small model is trained once per module on a subset of the real DR10 spectra (in a temporary
folder); the command then labels real files of every layout plus corrupted, duplicated, junk and
missing files: the bad ones are reported with a reason, never fatal, and every good file gets
exactly one row.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lamostcannon import cli

N_GOOD_DR10 = 24


@pytest.fixture(scope="module")
def small_model(real_lamost, tmp_path_factory):
    """A 3-label model trained on ~100 real DR10 FGK spectra, with KDE boundaries beside it."""
    from lamostcannon import real, validation
    from lamostcannon.cannon import CannonModel
    from lamostcannon.spectra import common_wavelength

    lamost = real_lamost / "dr10"
    work = tmp_path_factory.mktemp("model")
    src = real.RealSources(lamost, lamost / "catalog.csv")
    sample = real.build_sample(src, limit=200, n_workers=1, store_path=work / "train.zarr")
    lab, flux, ivar = sample.subset(sample.table["train"].to_numpy())
    assert len(lab) > 80
    model = CannonModel(list(sample.label_names), common_wavelength()).train(lab, flux, ivar)
    path = work / "model_small.fits"
    model.write(path)
    res = model.test(flux, ivar)
    bounds = validation.extrapolation_boundaries(lab, res.labels, label_names=model.label_names)
    validation.write_boundaries(bounds, work / "extrapolation_small.json")
    # the calibrations beside it, as notebook 09 writes them (a 4-fold CV keeps this quick)
    from lamostcannon import trust

    cv = validation.cross_validate(lab, flux, ivar, list(model.label_names), k=4, seed=1,
                                   n_jobs=1, wavelength=common_wavelength())
    trust.calibrate(model, cv, lab, fit_rows=cv["fold"].to_numpy() % 2 == 0, model_path=path)
    return path


@pytest.fixture
def spectra_dir(real_lamost, tmp_path):
    """Real files of every layout, plus a truncated copy, a duplicate copy and a junk file.

    Returns (folder, good files in input (sorted) order, bad file names).
    """
    lamost = real_lamost
    folder = tmp_path / "spectra"
    folder.mkdir()
    dr10 = sorted((lamost / "dr10").glob("spec-*.fits.gz"))[200:200 + N_GOOD_DR10]
    good = [shutil.copy(p, folder / p.name) for p in dr10]
    for p in sorted((lamost / "formats").iterdir()):
        good.append(shutil.copy(p, folder / p.name))
    data = dr10[0].read_bytes()
    (folder / "zz_truncated.fits.gz").write_bytes(data[: len(data) // 3])
    shutil.copy(dr10[0], folder / "zz_duplicate.fits.gz")   # same obsid as a good file
    (folder / "zz_junk.fits").write_text("not a FITS file\n")
    good = sorted(Path(p) for p in good)
    return folder, good, ["zz_duplicate.fits.gz", "zz_junk.fits", "zz_truncated.fits.gz"]


def _read(path):
    from astropy.table import Table

    if str(path).endswith(".fits"):
        t = Table.read(path)
        t.convert_bytestring_to_unicode()
        return t.to_pandas()
    return pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_csv(path)


# --------------------------------------------------------------------------------------------


def test_paths_beside_the_model(tmp_path):
    model = tmp_path / "model_dwarf.fits"
    assert cli.boundaries_path_for(model) is None
    (tmp_path / "extrapolation_dwarf.json").write_text("{}")
    assert cli.boundaries_path_for(model) == tmp_path / "extrapolation_dwarf.json"
    (tmp_path / "model_dwarf.extrapolation.json").write_text("{}")
    assert cli.boundaries_path_for(model) == tmp_path / "model_dwarf.extrapolation.json"
    assert cli.errors_path_for(tmp_path / "labels.fits") == tmp_path / "labels.errors.csv"


def test_collect_inputs_dedupes_and_keeps_order(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("b.fits.gz", "a.fits", "notes.txt"):
        (tmp_path / "d" / name).write_bytes(b"")
    files = cli.collect_inputs([tmp_path / "d" / "b.fits.gz", tmp_path / "d",
                                tmp_path / "missing.fits"])
    assert [f.name for f in files] == ["b.fits.gz", "a.fits", "missing.fits"]


def test_help_lists_the_label_command():
    from lamostcannon.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["label", "--help"])
    assert exc.value.code == 0


@pytest.mark.real
def test_label_folder_reports_bad_files(small_model, spectra_dir, tmp_path, capsys):
    folder, good, bad = spectra_dir
    out = tmp_path / "out" / "labels.fits"
    missing = tmp_path / "nowhere.fits.gz"
    rc = cli.main(["label", "--model", str(small_model), str(folder), str(missing),
                   "-o", str(out), "--workers", "1", "--chunk-size", "5", "--no-progress"])
    assert rc == 0
    assert f"labelled {len(good)} of {len(good) + len(bad) + 1} files" in capsys.readouterr().out
    t = _read(out)
    # every good file exactly once, in input order; no duplicate observation
    assert t["filename"].tolist() == [p.name for p in good]
    ob = t["obsid"].to_numpy()
    assert len(np.unique(ob[ob >= 0])) == (ob >= 0).sum()
    assert set(t["layout"]) == {"dr1-3", "dr4-9", "dr10+"}
    for col in ("model", "snr", "teff", "e_teff", "e_teff_random", "e_teff_formal", "logg",
                "fe_h", "chi2", "chi2_per_pixel", "n_pixels", "cannon_flag", "ood_score",
                "teff_extrap", "kde_extrap", "outside_training", "quality_flag", "class"):
        assert col in t.columns, col
    assert np.isfinite(t[["teff", "logg", "fe_h", "e_teff", "chi2", "ood_score"]].to_numpy()).all()
    assert (t["e_teff"] >= t["e_teff_random"]).all() and (t["e_teff_random"] >= t["e_teff_formal"]).all()
    assert (t["n_pixels"] > 2000).all()
    errors = pd.read_csv(cli.errors_path_for(out))
    assert sorted(Path(s).name for s in errors["source"]) == sorted(bad + [missing.name])
    reasons = dict(zip((Path(s).name for s in errors["source"]), errors["reason"]))
    assert "truncated" in reasons["zz_truncated.fits.gz"]
    assert "duplicate obsid" in reasons["zz_duplicate.fits.gz"]
    assert "not a FITS file" in reasons["zz_junk.fits"]
    assert reasons[missing.name] == "file not found"
    # written atomically: nothing else left in the output folder
    assert sorted(p.name for p in out.parent.iterdir()) == ["labels.errors.csv", "labels.fits"]


@pytest.mark.real
def test_label_command_with_workers_matches_in_process(small_model, spectra_dir, tmp_path):
    """``python -m lamostcannon label`` with 2 processes gives the same table as 1 process."""
    folder, good, _ = spectra_dir
    files = sorted(str(p) for p in folder.iterdir())
    one = tmp_path / "one.parquet"
    run = cli.label_files(small_model, files, one, workers=1, chunk_size=7, progress=False)
    assert run.n_labelled == len(good)
    two = tmp_path / "two.csv"
    proc = subprocess.run([sys.executable, "-m", "lamostcannon", "label", "--model",
                           str(small_model), *files, "-o", str(two), "--workers", "2",
                           "--chunk-size", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "label" in proc.stderr  # the progress bar (tqdm) writes to stderr
    a, b = _read(one), _read(two)
    assert a["filename"].tolist() == b["filename"].tolist()
    np.testing.assert_allclose(a[["teff", "logg", "fe_h"]].to_numpy(),
                               b[["teff", "logg", "fe_h"]].to_numpy(), rtol=1e-9)
    assert (a["quality_flag"].to_numpy() == b["quality_flag"].to_numpy()).all()
    # the labels are polished on the exact chi2 (float64); the errors come from the Hessian of
    # the chi2 polynomial, built with a float32 product whose rounding depends on the chunk's size
    # and the CPU's BLAS kernels (1.8e-6 relative between chunks of 7 and 4 on an AMD EPYC):
    # equal to far below their meaning
    np.testing.assert_allclose(a["e_teff"], b["e_teff"], rtol=1e-4)


@pytest.mark.real
def test_label_refuses_to_overwrite_and_bad_model(small_model, spectra_dir, tmp_path, capsys):
    folder, _, _ = spectra_dir
    out = tmp_path / "labels.csv"
    out.write_text("keep me\n")
    assert cli.main(["label", "-m", str(small_model), str(folder), "-o", str(out),
                     "--no-progress"]) == 2
    assert out.read_text() == "keep me\n"
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["label", "-m", str(tmp_path / "none.fits"), str(folder), "-o",
                     str(tmp_path / "x.fits"), "--no-progress"]) == 2
    broken = tmp_path / "broken.fits"
    broken.write_bytes(small_model.read_bytes()[:5000])
    assert cli.main(["label", "-m", str(broken), str(folder), "-o", str(tmp_path / "y.fits"),
                     "--no-progress"]) == 2
    assert not (tmp_path / "y.fits").exists()
    assert cli.main(["label", "-m", str(small_model), str(folder), "-o",
                     str(tmp_path / "z.txt"), "--no-progress"]) == 2


@pytest.mark.real
def test_label_all_bad_files(small_model, tmp_path):
    (tmp_path / "a.fits").write_text("junk")
    out = tmp_path / "labels.fits"
    rc = cli.main(["label", "-m", str(small_model), str(tmp_path / "a.fits"), "-o", str(out),
                   "--no-progress"])
    assert rc == 1
    assert len(_read(out)) == 0
    assert len(pd.read_csv(cli.errors_path_for(out))) == 1


@pytest.mark.real
def test_extrapolation_flags_on_hot_stars(small_model, real_lamost, tmp_path):
    """Stars much hotter than the training set are flagged."""
    lamost = real_lamost / "dr10"
    cat = pd.read_csv(lamost / "catalog.csv")
    hot = cat[cat["teff"] > 8000]["filename"].iloc[:12]
    out = tmp_path / "hot.parquet"
    run = cli.label_files(small_model, [lamost / f for f in hot], out, progress=False)
    t = _read(out)
    assert run.n_labelled == len(t) == len(hot)
    assert (t["quality_flag"] != 0).mean() > 0.5


def test_auto_workers_start_processes_only_when_they_pay():
    assert cli.auto_workers(500, 2, idle_cpus=2) == 1
    assert cli.auto_workers(cli.FILES_PER_WORKER * 2, 2, idle_cpus=2) == 2
    assert cli.auto_workers(cli.FILES_PER_WORKER * 10, 4, idle_cpus=8) == 4
    assert cli.auto_workers(cli.FILES_PER_WORKER * 10, 4, idle_cpus=0.3) == 1   # busy machine
    assert cli.auto_workers(0, 8, idle_cpus=8) == 1


def test_claim_output_is_exclusive_and_leaves_nothing(tmp_path):
    out = tmp_path / "labels.fits"
    with cli.claim_output(out) as lock:
        assert lock == cli.lock_path_for(out) and lock.exists()
        with pytest.raises(cli.OutputBusyError, match="another label run"):
            with cli.claim_output(out):
                pass
    assert not cli.lock_path_for(out).exists()
    with cli.claim_output(out):        # free again
        pass


@pytest.mark.real
def test_concurrent_label_runs_to_one_output(small_model, spectra_dir, tmp_path):
    """Two real ``label`` processes on one output: the second, started while the first holds the
    output, is refused with a one-line error (exit 2) and the first run's rows are all there."""
    import os
    import time

    folder, good, _ = spectra_dir
    many = tmp_path / "many"
    many.mkdir()
    for k in range(12):   # the same good files under 12 names: a run of a few seconds
        for p in good[:20]:
            os.symlink(p, many / f"{k:02d}_{p.name}")
    out = tmp_path / "labels.parquet"
    cmd = [sys.executable, "-m", "lamostcannon", "label", "--model", str(small_model), str(many),
           "-o", str(out), "--overwrite", "--no-progress", "--workers", "1", "--chunk-size", "8"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = cli.lock_path_for(out)
    deadline = time.monotonic() + 120
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.poll() is None, "the first run ended before the second could start"
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 2, second.stderr
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "being written by another label run" in lines[0], second.stderr
    t = _read(out)
    errors = pd.read_csv(cli.errors_path_for(out))
    # every copy is either labelled or reported as a duplicate of an obsid labelled before
    assert len(t) + len(errors) == 12 * 20 and errors["reason"].str.startswith("duplicate").all()
    assert {name[3:] for name in t["filename"]} == {p.name for p in good[:20]}
    assert not lock.exists()


@pytest.mark.real
def test_model_spectra_and_two_models(small_model, spectra_dir, tmp_path):
    """``--model-spectra`` writes the data and the model at the fitted labels of every labelled
    file; ``--giant-model`` chooses per spectrum by eq. 1 from ``--pipeline-labels``, and without
    them fits both and sets NO_PIPELINE."""
    from astropy.io import fits

    from lamostcannon import labelling

    folder, good, _ = spectra_dir
    files = [str(p) for p in good[:10]]
    out, ms = tmp_path / "one.fits", tmp_path / "ms.fits"
    run = cli.label_files(small_model, files, out, model_spectra=ms, progress=False)
    assert run.model_spectra == ms and run.workers == 1
    t = _read(out)
    with fits.open(ms) as h:
        f, iv, m = (h[k].data.astype(float) for k in ("FLUX", "IVAR", "MODEL"))
        stars = h["STARS"].data
        assert h["WAVELENGTH"].data.shape == (f.shape[1],)
    assert f.shape[0] == len(t) and list(stars["filename"]) == t["filename"].tolist()
    s2 = labelling.ModelBundle.load(small_model).model.s2
    with np.errstate(invalid="ignore"):
        chi2 = np.nansum(np.where(iv > 0, (f - m) ** 2 * iv / (1 + iv * s2), 0), axis=1)
    np.testing.assert_allclose(chi2, t["chi2"], rtol=5e-3)
    # two models: eq. 1 from a pipeline table (by filename), else both models + NO_PIPELINE
    giant = tmp_path / "model_g.fits"
    giant.write_bytes(small_model.read_bytes())
    lasp = tmp_path / "lasp.csv"
    pd.DataFrame({"filename": [p.name for p in good[:10]],
                  "teff": [4800.0] * 5 + [5800.0] * 4 + [-9999.0],
                  "logg": [2.5] * 5 + [4.4] * 4 + [-9999.0]}).to_csv(lasp, index=False)
    out2 = tmp_path / "two.csv"
    cli.label_files(small_model, files, out2, giant_model_path=giant, pipeline_labels=lasp,
                    progress=False)
    t2 = _read(out2)
    assert t2["model"].tolist()[:9] == ["giant"] * 5 + ["dwarf"] * 4
    nopipe = (t2["quality_flag"].to_numpy() & labelling.QF_NO_PIPELINE) != 0
    assert nopipe.tolist() == [False] * 9 + [True]
    out3 = tmp_path / "three.csv"
    cli.label_files(small_model, files, out3, giant_model_path=giant, progress=False)
    assert ((_read(out3)["quality_flag"] & labelling.QF_NO_PIPELINE) != 0).all()
    assert cli.main(["label", "-m", str(small_model), *files, "-o", str(tmp_path / "x.fits"),
                     "--model-spectra", str(tmp_path / "x.fits"), "--no-progress"]) == 2


@pytest.mark.real
def test_read_step_gives_the_bytes_of_one_file_at_a_time(spectra_dir, monkeypatch):
    """``label`` reads in batches (the ingest's): every row is the bytes ``preprocess`` gives
    that file alone, failures keep their index and reason, across batch boundaries."""
    from lamostcannon import spectra

    folder, good, bad = spectra_dir
    files = sorted(str(p) for p in folder.iterdir())
    monkeypatch.setattr(cli, "READ_BATCH", 3)
    keep, metas, flux, ivar, failed = cli._read_chunk(files)
    assert [Path(files[k]).name for k in keep] == sorted([p.name for p in good] + ["zz_duplicate.fits.gz"])
    assert len(failed) + len(keep) == len(files)
    for row, k in enumerate(keep):
        f1, i1 = spectra.preprocess(spectra.read_lamost(files[k]))
        assert np.array_equal(flux[row].view(np.uint32), f1.view(np.uint32)), files[k]
        assert np.array_equal(ivar[row].view(np.uint32), i1.view(np.uint32)), files[k]
        assert metas[row]["obsid"] == spectra.read_lamost(files[k]).meta["obsid"]
    for k, why in failed:
        with pytest.raises(spectra.SpectrumReadError) as exc:
            spectra.preprocess(spectra.read_lamost(files[k]))
        assert exc.value.reason == why
