"""Regression tests for the attacks of session 7 (``/work/team/notes/attacks_s7.md``).

Hostile inputs that used to crash a long run, give a silently wrong result or a raw traceback:
header values that do not fit the store's int64 columns (an ingest crashed on the first such
file, and on every rerun), table columns that are not numbers, values so large or small that
continuum normalisation leaves no usable pixel (an empty spectrum was stored), mask values
beyond int64, a training set without one usable pixel, and ``label`` command misuse (an output
that is the model or an input, an output folder that cannot be written, a damaged calibration
file beside the model, Ctrl-C, two runs sharing a ``--model-spectra`` file). Everything here is
synthetic (no real spectra needed) and fast.
"""

from __future__ import annotations

import gzip
import random
import warnings

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from lamostcannon import cli
from lamostcannon import spectra as sp
from lamostcannon.cannon import CannonModel
from lamostcannon.store import SpectraStore, ingest

P = sp.N_PIXELS


def _image(flux=None, ivar=None, andmask=None):
    """A DR4-9 style 5 x N image on the common grid (observed = rest frame at z = 0)."""
    x = np.linspace(0.0, 1.0, P)
    f = (100.0 + 20.0 * x - 5.0 * np.exp(-0.5 * ((x - 0.5) / 0.002) ** 2)) if flux is None \
        else flux
    rows = [f, np.ones(P) if ivar is None else ivar, sp.common_wavelength(),
            np.zeros(P) if andmask is None else andmask, np.zeros(P)]
    return np.vstack(rows).astype(np.float32)


def _write(path, image=None, **cards):
    header = fits.Header({"OBSID": 100 + len(path.name), "Z": 0.0, "MJD": 58000,
                          "DESIG": "LAMOST J000000.00+000000.0", "CLASS": "STAR"})
    for key, value in cards.items():
        header[key] = value
    fits.PrimaryHDU(_image() if image is None else image, header).writeto(path)
    return path


def _dr10(path, **columns):
    """A DR10 style file: empty primary, COADD table; ``columns`` replace its columns."""
    cols = {"FLUX": _image()[0], "IVAR": np.ones(P, np.float32),
            "WAVELENGTH": sp.common_wavelength().astype(np.float32),
            "ANDMASK": np.zeros(P, np.float32), "ORMASK": np.zeros(P, np.float32)}
    cols.update(columns)
    fcols = []
    for name, v in cols.items():
        v = np.asarray(v)
        if v.dtype.kind == "U":
            fcols.append(fits.Column(name=name, format="20A", array=v.reshape(1)))
        else:
            fcols.append(fits.Column(name=name, format=f"{v.size}E", array=v[None]))
    header = fits.Header({"OBSID": 7, "Z": 0.0, "MJD": 59000})
    fits.HDUList([fits.PrimaryHDU(header=header),
                  fits.BinTableHDU.from_columns(fcols, name="COADD")]).writeto(path)
    return path


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    """A hostile file must not leak numpy warnings either (they hid an overflow before)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


# ------------------------------------------------------------------------------ reading

def test_header_values_that_do_not_fit_an_int64_are_refused_or_unknown(tmp_path):
    huge = _write(tmp_path / "huge_obsid.fits", OBSID=2 ** 70)
    half = _write(tmp_path / "half_obsid.fits", OBSID=1.5)
    with pytest.raises(sp.SpectrumReadError, match="OBSID .* does not fit a 64-bit integer"):
        sp.read_lamost(huge)
    with pytest.raises(sp.SpectrumReadError, match="OBSID = 1.5"):  # was silently obsid 1
        sp.read_lamost(half)
    whole = sp.read_lamost(_write(tmp_path / "float_obsid.fits", OBSID=123456.0))
    assert whole.meta["obsid"] == 123456
    assert sp.read_lamost(_write(tmp_path / "mjd.fits", MJD=1e30)).meta["mjd"] == -1


def test_an_ingest_goes_on_past_header_values_beyond_int64(tmp_path):
    """One such file crashed the whole ingest (OverflowError in the parent), on every rerun."""
    good = [_write(tmp_path / f"good{k}.fits", OBSID=1000 + k) for k in range(3)]
    bad = _write(tmp_path / "huge_obsid.fits", OBSID=2 ** 70)
    odd_mjd = _write(tmp_path / "odd_mjd.fits", OBSID=2000, MJD=1e30)
    files = [good[0], bad, good[1], odd_mjd, good[2]]
    report = ingest(files, tmp_path / "s.zarr", n_workers=1, progress=False).set_index("source")
    assert report.loc[str(bad), "status"] == "failed"
    assert "64-bit" in report.loc[str(bad), "reason"]
    assert (report.drop(index=str(bad))["status"] == "stored").all()
    meta = SpectraStore(tmp_path / "s.zarr").meta
    assert meta["obsid"].tolist() == [1000, 1001, 2000, 1002]
    assert meta["mjd"].tolist() == [58000, 58000, -1, 58000]


def test_columns_that_are_not_numbers_are_refused_with_a_reason(tmp_path):
    cases = {_dr10(tmp_path / "flux.fits", FLUX=np.array("hello")): "flux is not a numeric",
             _dr10(tmp_path / "wave.fits", WAVELENGTH=np.array("hello")):
                 "wavelengths are not numbers"}
    for path, reason in cases.items():
        with pytest.raises(sp.SpectrumReadError, match=reason):
            sp.read_lamost(path)  # was a raw TypeError / ValueError from numpy
    report = ingest(list(cases), tmp_path / "s.zarr", n_workers=1, progress=False)
    assert (report["status"] == "failed").all()
    assert not report["reason"].str.contains("unexpected").any()


def test_mask_values_beyond_int64_mark_bad_pixels_without_a_warning(tmp_path):
    mask = np.zeros(P, np.float32)
    mask[:10] = 1e30
    mask[10:20] = np.nan
    s = sp.read_lamost(_dr10(tmp_path / "mask.fits", ANDMASK=mask))
    assert (s.andmask[:20] != 0).all() and (s.andmask[20:] == 0).all()


@pytest.mark.parametrize("what", ["huge flux", "huge ivar", "subnormal ivar"])
def test_values_that_leave_no_usable_pixel_are_refused_not_stored_empty(tmp_path, what):
    """Normalisation dropped every pixel (float32 overflow) and the empty spectrum was stored
    as a good row; now the file is refused with the reason."""
    image = _image()
    if what == "huge flux":
        image[0] = 3e38
    elif what == "huge ivar":
        image[1] = 3e38
    else:
        image[1] = 1e-44
    path = _write(tmp_path / "bad.fits", image)
    with pytest.raises(sp.SpectrumReadError, match="after continuum normalisation"):
        sp.preprocess(sp.read_lamost(path))
    with pytest.raises(sp.SpectrumReadError, match="after continuum normalisation"):
        sp.preprocess_many([sp.read_lamost(path)])
    good = _write(tmp_path / "good.fits", OBSID=5)
    report = ingest([good, path], tmp_path / "s.zarr", n_workers=1,
                    progress=False).set_index("source")
    assert report.loc[str(path), "status"] == "failed"
    assert "after continuum normalisation" in report.loc[str(path), "reason"]
    store = SpectraStore(tmp_path / "s.zarr")
    assert len(store) == 1 and (store.read([0])[1] > 0).sum() > 3000


def test_damaged_files_give_a_spectrum_or_a_reason_never_another_error(tmp_path):
    """A small deterministic fuzz: truncations and bit flips of a plain and a gzipped file."""
    plain = _write(tmp_path / "src.fits").read_bytes()
    gz = gzip.compress(plain, mtime=0)
    rnd = random.Random(7)
    outcomes = {"read": 0, "refused": 0}
    for k in range(160):
        data = bytearray(plain if k % 2 else gz)
        if k % 4 < 2:
            data = data[:rnd.randrange(len(data))]
        else:
            for _ in range(rnd.randint(1, 6)):
                i = rnd.randrange(len(data))
                data[i] ^= 1 << rnd.randrange(8)
        path = tmp_path / f"f{k}.fits"
        path.write_bytes(bytes(data))
        try:
            f, i = sp.preprocess(sp.read_lamost(path))
        except sp.SpectrumReadError as exc:
            assert exc.reason and exc.path == str(path)
            outcomes["refused"] += 1
        else:
            assert np.isfinite(f).all() and np.isfinite(i).all() and (i >= 0).all()
            outcomes["read"] += 1
    assert outcomes["read"] and outcomes["refused"]


# ------------------------------------------------------------------------------ the model

def _model(rng, n=40):
    labels = rng.normal([5000.0, 3.0, 0.0], [300.0, 0.5, 0.2], size=(n, 3))
    x = (labels - labels.mean(0)) / labels.std(0)
    flux = 1.0 + 0.01 * x @ rng.normal(size=(3, P)) + 0.001 * rng.standard_normal((n, P))
    return labels, flux, np.full((n, P), 1e6)


def test_training_without_a_usable_pixel_is_refused(rng):
    labels, flux, ivar = _model(rng)
    with pytest.raises(ValueError, match="no pixel has enough training spectra"):
        CannonModel(["teff", "logg", "fe_h"]).train(labels, flux, np.zeros_like(ivar))
    model = CannonModel(["teff", "logg", "fe_h"]).train(labels, flux, ivar)
    model.pixel_ok[:] = False  # as a model file whose PIXOK is all False would read
    with pytest.raises(ValueError, match="no trained pixel"):  # was a numpy reduction error
        model.test(flux[:2], ivar[:2])


# ------------------------------------------------------------------------------ the label command

@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    labels, flux, ivar = _model(np.random.default_rng(3))
    path = tmp_path_factory.mktemp("model") / "model_tiny.fits"
    CannonModel(["teff", "logg", "fe_h"], sp.common_wavelength()).train(labels, flux,
                                                                        ivar).write(path)
    return path


def _label(*argv):
    return cli.main(["label", "--no-progress", *map(str, argv)])


def test_label_never_writes_over_a_file_it_reads(model_path, tmp_path, capsys):
    spectrum = _write(tmp_path / "star.fits")
    before = model_path.read_bytes()
    assert _label("--model", model_path, spectrum, "-o", model_path, "--overwrite") == 2
    assert "is the --model file" in capsys.readouterr().err
    assert _label("--model", model_path, spectrum, "-o", tmp_path / "a.fits",
                  "--model-spectra", model_path, "--overwrite") == 2
    assert "is the --model file" in capsys.readouterr().err
    assert model_path.read_bytes() == before  # the model used to be replaced by the labels
    table = tmp_path / "lasp.errors.csv"  # the error report of -o lasp.csv
    table.write_text("filename,teff,logg\nstar.fits,5000,4\n")
    assert _label("--model", model_path, spectrum, "-o", tmp_path / "lasp.csv",
                  "--pipeline-labels", table) == 2
    assert "the error report" in capsys.readouterr().err and "5000" in table.read_text()
    spectrum_bytes = spectrum.read_bytes()
    assert _label("--model", model_path, tmp_path, "-o", spectrum, "--overwrite") == 2
    assert "is also one of the input spectra" in capsys.readouterr().err
    assert spectrum.read_bytes() == spectrum_bytes
    assert _label("--model", model_path, spectrum, "-o", tmp_path / "ok.fits") == 0


def test_label_says_why_when_it_cannot_write_or_load(model_path, tmp_path, capsys):
    spectrum = _write(tmp_path / "star.fits")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert _label("--model", model_path, spectrum, "-o", blocker / "out.fits") == 2
    err = capsys.readouterr().err
    assert err.startswith("label: error:") and "Traceback" not in err
    # a damaged calibration beside the model: a one-line error naming the model
    folder = tmp_path / "m"
    folder.mkdir()
    copy = folder / "model_tiny.fits"
    copy.write_bytes(model_path.read_bytes())
    (folder / "extrapolation_tiny.json").write_text("{}")
    assert _label("--model", copy, spectrum, "-o", tmp_path / "b.fits") == 2
    err = capsys.readouterr().err
    assert "cannot load the model" in err and str(copy) in err


def test_label_ctrl_c_is_one_line_and_leaves_no_output(model_path, tmp_path, monkeypatch,
                                                       capsys):
    spectrum = _write(tmp_path / "star.fits")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_label_sources", interrupted)
    out = tmp_path / "out.fits"
    assert _label("--model", model_path, spectrum, "-o", out, "--model-spectra",
                  tmp_path / "ms.fits") == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["star.fits"]


def test_the_model_spectra_file_is_claimed_like_the_output(model_path, tmp_path, capsys):
    spectrum = _write(tmp_path / "star.fits")
    shared = tmp_path / "ms.fits"
    with cli.claim_output(shared):  # another run writing ms.fits (as its output or spectra)
        assert _label("--model", model_path, spectrum, "-o", tmp_path / "b.fits",
                      "--model-spectra", shared) == 2
        assert "another label run" in capsys.readouterr().err
    assert not (tmp_path / "b.fits").exists()
    assert _label("--model", model_path, spectrum, "-o", tmp_path / "b.fits",
                  "--model-spectra", shared) == 0
    table = pd.read_csv(tmp_path / "b.errors.csv")
    assert table.empty


# ------------------------------------------------------------------------------ file names

def _non_utf8_file(folder):
    """A spectrum under a name that is not UTF-8 (Latin-1 bytes), or skip where the file
    system refuses such names."""
    import os

    name = os.fsencode(folder) + b"/spec-\xe9t\xe9.fits"
    try:
        with open(name, "wb") as fh:
            fh.write(_write(folder / "tmp_src.fits", OBSID=99).read_bytes())
    except (OSError, UnicodeError) as exc:  # pragma: no cover - e.g. macOS APFS
        pytest.skip(f"this file system refuses non-UTF-8 names: {exc}")
    (folder / "tmp_src.fits").unlink()
    return os.fsdecode(name)


def test_a_file_name_that_is_not_utf8_is_listed_not_fatal(model_path, tmp_path):
    """One such name stopped the ingest at its first commit (and every resume at its start)
    and lost a whole label run at the final write (pyarrow refuses surrogate escapes)."""
    folder = tmp_path / "in"
    folder.mkdir()
    good = [_write(folder / f"good{k}.fits", OBSID=10 + k) for k in range(2)]
    bad = _non_utf8_file(folder)
    for attempt in range(2):  # the first run, then the resume
        report = ingest(folder, tmp_path / "s.zarr", n_workers=1, progress=False)
        assert report["status"].tolist() == (["stored"] * 2 if attempt == 0 else
                                             ["already_stored"] * 2) + ["failed"]
        assert "not valid UTF-8" in report["reason"].iloc[2]
        assert report["source"].iloc[2].endswith("spec-\\xe9t\\xe9.fits")
        assert pd.read_csv(tmp_path / "s.zarr" / "ingest_report.csv").shape[0] == 3
    assert len(SpectraStore(tmp_path / "s.zarr")) == 2
    for suffix in (".fits", ".parquet", ".csv"):
        out = tmp_path / f"labels{suffix}"
        assert _label("--model", model_path, folder, "-o", out) == 0
        errors = pd.read_csv(cli.errors_path_for(out))
        assert len(errors) == 1 and "not valid UTF-8" in errors["reason"].iloc[0]
    assert sorted(pd.read_csv(tmp_path / "labels.csv")["filename"]) == [g.name for g in good]
    assert bad.endswith(".fits")


# ------------------------------------------------------------------------------ a damaged store

def test_a_damaged_store_says_so_and_which_file(tmp_path):
    """Files damaged outside the code (writes are atomic, so no killed run does this) gave a
    bare JSONDecodeError, ArrowInvalid, KeyError('flux') or blosc RuntimeError."""
    import json
    import shutil

    from lamostcannon.store import StoreDamaged

    base = tmp_path / "base.zarr"
    with SpectraStore.create(base, chunk_rows=8) as store:
        store.append(np.ones((16, P), np.float32), np.ones((16, P), np.float32),
                     pd.DataFrame({"obsid": np.arange(16)}))

    def damaged(name, damage):
        path = tmp_path / name
        shutil.copytree(base, path)
        damage(path)
        return path

    commit = damaged("commit.zarr", lambda p: (p / "COMMIT.json").write_text("{cut sh"))
    with pytest.raises(StoreDamaged, match="COMMIT.json is unreadable"):
        SpectraStore(commit)
    with pytest.raises(StoreDamaged, match="COMMIT.json is unreadable"):
        ingest([], commit, n_workers=1, progress=False)
    rows = damaged("rows.zarr", lambda p: (p / "COMMIT.json").write_text(json.dumps(
        {**json.loads((p / "COMMIT.json").read_text()), "n_rows": 99})))
    with pytest.raises(StoreDamaged, match="inconsistent"):
        SpectraStore(rows)

    def cut_part(p):
        part = sorted((p / "meta").glob("*.parquet"))[0]
        part.write_bytes(part.read_bytes()[:100])

    with pytest.raises(StoreDamaged, match="metadata part .* is unreadable"):
        SpectraStore(damaged("part.zarr", cut_part)).read_meta()

    def cut_chunk(p):
        chunk = sorted(c for c in (p / "ivar").rglob("*") if c.is_file()
                       and c.name not in ("zarr.json", ".zarray", ".zattrs"))[-1]
        chunk.write_bytes(chunk.read_bytes()[:10])

    store = SpectraStore(damaged("chunk.zarr", cut_chunk))
    with pytest.raises(StoreDamaged, match="cannot read rows"):
        store.read()
    assert len(SpectraStore(base).read()[0]) == 16  # the undamaged store reads


def test_a_bad_size_limit_in_the_environment_is_named(tmp_path):
    import os
    import subprocess
    import sys

    for value in ("abc", "-1"):
        env = dict(os.environ, LAMOSTCANNON_MAX_SPECTRUM_BYTES=value)
        done = subprocess.run([sys.executable, "-c", "import lamostcannon.spectra"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0
        assert "LAMOSTCANNON_MAX_SPECTRUM_BYTES must be a positive number" in done.stderr


def test_a_label_table_that_lists_a_spectrum_twice_trains_on_it_once(tmp_path):
    """Duplicated rows put the same star twice in the training set (and on both sides of a CV
    split) without a word."""
    from lamostcannon import real

    folder = tmp_path / "spectra"
    folder.mkdir()
    names = [_write(folder / f"s{k}.fits", OBSID=500 + k).name for k in range(4)]
    (folder / "copy_of_s1.fits").write_bytes((folder / names[1]).read_bytes())  # same obsid
    rows = names + [names[2], "copy_of_s1.fits"]
    pd.DataFrame({"filename": rows, "teff": 5000.0, "logg": 4.0, "fe_h": 0.0,
                  "snrg": 100.0}).to_csv(tmp_path / "labels.csv", index=False)
    sample = real.build_sample(real.RealSources(folder, tmp_path / "labels.csv"), n_workers=1,
                               store_path=tmp_path / "s.zarr")
    table = sample.table
    assert table["ok"].tolist() == [True] * 4 + [False, False]
    assert table["reason"].iloc[4].startswith("duplicate of row 2")
    assert table["reason"].iloc[5].startswith("duplicate of row 1")
    assert table["train"].sum() == 4


# ------------------------------------------------------------------------------ archives

def test_a_download_is_never_written_outside_the_output_folder(tmp_path):
    """Destinations come from the archive's catalogue (``filename`` from its plan id): one
    holding '../' would have been written, or an existing file adopted, outside the folder."""
    from lamostcannon.archives import Downloader, FileTask, Manifest

    root = tmp_path / "raw"
    root.mkdir()
    outside = tmp_path / "precious.fits.gz"
    outside.write_bytes(b"keep me")
    tasks = [FileTask("http://127.0.0.1:9/x", "lamost/spectra/spec-1-../../../../precious.fits.gz",
                      key="1"),
             FileTask("http://127.0.0.1:9/y", "/etc/spec.fits.gz", key="2")]
    report = Downloader(progress=False, retries=0).fetch_many(tasks, root, Manifest(root),
                                                              what="LAMOST spectra")
    assert [f.key for f in report.failures] == ["1", "2"]
    assert all("outside the output folder" in f.reason for f in report.failures)
    assert not report.skipped and not report.fetched
    assert outside.read_bytes() == b"keep me"


def test_label_refuses_a_model_of_another_wavelength_grid(tmp_path, capsys):
    """A model trained on a shifted grid labelled every file from misaligned pixels, without a
    word; one of a shorter grid failed every file one by one."""
    labels, flux, ivar = _model(np.random.default_rng(5))
    spectrum = _write(tmp_path / "star.fits")
    for name, wave in (("shifted", sp.common_wavelength() * 1.001),
                       ("short", sp.common_wavelength()[:2000])):
        path = tmp_path / f"model_{name}.fits"
        n = len(wave)
        CannonModel(["teff", "logg", "fe_h"], wave).train(labels, flux[:, :n], ivar[:, :n]
                                                          ).write(path)
        assert _label("--model", path, spectrum, "-o", tmp_path / f"{name}.csv") == 2
        assert "train the model on that grid" in capsys.readouterr().err
        assert not (tmp_path / f"{name}.csv").exists()


def test_settings_and_boundaries_files_name_what_is_wrong(tmp_path, monkeypatch):
    """A bad environment value names its variable; a damaged boundaries file names the file."""
    from lamostcannon import config, validation

    monkeypatch.setenv("LAMOSTCANNON_WORKERS", "two")
    with pytest.raises(ValueError, match="LAMOSTCANNON_WORKERS must be a whole number"):
        config.settings()
    monkeypatch.setenv("LAMOSTCANNON_WORKERS", "2")
    monkeypatch.setenv("LAMOSTCANNON_SEED", "")
    assert config.settings().seed == 2020 and config.settings().n_workers == 2
    for text in ("{}", "[]", "not json", '{"labels": {"teff": {"low": 1}}}'):
        path = tmp_path / "extrapolation_x.json"
        path.write_text(text)
        with pytest.raises(ValueError, match="extrapolation_x.json: not an extrapolation"):
            validation.read_boundaries(path)
