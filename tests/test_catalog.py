"""Tests of the catalogue driver (lamostcannon.catalog): chunked labelling, resumption after
``kill -9``, the Dask path, repeat combination, the Gaia match and the Table 1 schema."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from lamostcannon import catalog, labels
from quadratic_teacher import teacher

P = 3909


# ------------------------------------------------------------------------------------------
# A stand-in model for the logic tests (the real CannonModel is used further down)
# ------------------------------------------------------------------------------------------

class StubModel:
    """Duck-typed model: labels = the first L flux values, chi2 = sum ivar (f - 1)^2."""

    def __init__(self, label_names, offset=0.0):
        self.label_names = tuple(label_names)
        self.wavelength = 10 ** (3.5682 + 1e-4 * np.arange(P))
        self.pixel_ok = np.ones(P, bool)
        self.theta = np.full((P, 2), offset)
        self.training_hash = f"stub-{len(label_names)}-{offset}"
        self.offset = offset

    def test(self, flux, ivar, windows=None, **kwargs):
        n, L = len(flux), len(self.label_names)
        ok = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)   # bad input is masked
        resid = np.where(ok, ivar * (np.where(ok, flux, 1) - 1 - self.offset) ** 2, 0)
        return SimpleNamespace(
            labels=flux[:, :L].astype(float), cov=np.tile(np.eye(L) * 0.01, (n, 1, 1)),
            chi2=resid.sum(1), chi2_windows={k: resid[:, w].sum(1) for k, w in (windows or {}).items()},
            n_pixels=ok.sum(1), n_iter=np.full(n, 3), converged=flux[:, 0] < 5,
            flag=np.zeros(n, int))


def stub_context(giant_offset=0.0):
    return catalog.LabelContext.from_models(StubModel(labels.DWARF_LABELS),
                                            StubModel(labels.GIANT_LABELS, giant_offset))


def meta_frame(n, teff=5800.0, logg=4.4, designation=None, snr=50.0):
    return pd.DataFrame({
        "obsid": np.arange(n, dtype=np.int64) + 100,
        "designation": designation if designation is not None else [f"J{i:04d}" for i in range(n)],
        "ra": np.linspace(10, 20, n), "dec": np.linspace(-5, 5, n), "snr_z": np.full(n, snr),
        "rv": np.zeros(n), "teff_lasp": np.broadcast_to(teff, n).astype(float),
        "logg_lasp": np.broadcast_to(logg, n).astype(float)})


# ------------------------------------------------------------------------------------------
# One chunk: model choice, union of labels, flags
# ------------------------------------------------------------------------------------------

def test_choose_model_eq1_and_unknown():
    giant, known = catalog.choose_model([4800, 4800, 6000, np.nan, 5000, -9999, 5800],
                                        [2.5, 4.5, 3.5, 2.0, np.nan, -9999, -9999.0])
    assert giant.tolist() == [True, False, True, False, False, False, False]
    # LAMOST's -9999 means "no pipeline parameters": both models are tried (it was a giant)
    assert known.tolist() == [True, True, True, False, False, False, False]


def test_observation_metadata_reads_lasp_sentinels_as_missing(tmp_path):
    from lamostcannon.spectra import SpectraStore

    with SpectraStore.create(tmp_path / "s.zarr", chunk_rows=8) as store:
        store.append(np.ones((3, P), np.float32), np.ones((3, P), np.float32),
                     pd.DataFrame({"obsid": [1, 2, 3], "designation": ["a", "b", "c"]}))
    cat = pd.DataFrame({"obsid": [1, 2, 3], "designation": ["a", "b", "c"], "ra": [1.0] * 3,
                        "dec": [2.0] * 3, "snrz": [50.0] * 3, "rv": [10.0, -9999.0, 0.0],
                        "teff": [5800.0, -9999.0, 4800.0], "logg": [4.4, -9999.0, 2.5],
                        "class": ["STAR", "STAR", "GALAXY"], "z": [0.0, 0.0, 0.1]})
    meta = catalog.observation_metadata(catalog.StoreReader(tmp_path / "s.zarr"), cat)
    assert np.isnan(meta.loc[1, ["teff_lasp", "logg_lasp", "rv"]].to_numpy(float)).all()
    assert meta["class"].tolist() == ["STAR", "STAR", "GALAXY"]
    out = catalog.label_chunk(np.ones((3, P), np.float32), np.full((3, P), 400, np.float32),
                              meta, stub_context())
    assert out.loc[1, "flag"] & catalog.FLAG_NO_LASP          # both models were tried
    from lamostcannon.labelling import QF_NO_PIPELINE, QF_NOT_STELLAR

    qf = out["quality_flag"].to_numpy()
    assert qf[1] & QF_NO_PIPELINE and not qf[0] & QF_NO_PIPELINE and qf[2] & QF_NOT_STELLAR


def test_label_chunk_union_of_labels_and_flags(rng):
    n = 6
    flux = (1 + 0.01 * rng.standard_normal((n, P))).astype(np.float32)
    ivar = np.full((n, P), 100, np.float32)
    ivar[1] = 0                       # no usable pixel
    flux[2, 0] = 9.0                  # the stub does not converge
    flux[3, 10] = np.nan              # a non-finite pixel is masked, not fatal
    meta = meta_frame(n, teff=[5800, 5800, 5800, 5800, 4500, np.nan],
                      logg=[4.4, 4.4, 4.4, 4.4, 2.0, np.nan])
    out = catalog.label_chunk(flux, ivar, meta, stub_context(giant_offset=0.5))
    assert list(out.columns) == list(catalog.observation_columns())
    assert out["giantmodel"].tolist() == [False, False, False, False, True, False]
    # dwarf rows have dwarf labels and NaN giant-only labels, and vice versa
    assert np.isfinite(out.loc[0, "alpha_fe"]) and np.isnan(out.loc[0, "mg_fe"])
    assert np.isfinite(out.loc[4, "mg_fe"]) and np.isnan(out.loc[4, "alpha_fe"])
    assert np.isfinite(out.loc[0, "chi2_alpha_fe"]) and np.isnan(out.loc[0, "chi2_mg_fe"])
    flag = out["flag"].to_numpy()
    assert flag[1] & catalog.FLAG_NO_PIXELS and np.isnan(out.loc[1, "teff"])
    assert flag[2] & catalog.FLAG_NOT_CONVERGED
    assert flag[3] == 0 and out.loc[3, "n_pixels"] == P - 1
    # no LASP labels: both models tried, the dwarf (offset 0) fits better
    assert flag[5] & catalog.FLAG_NO_LASP and not out.loc[5, "giantmodel"]
    assert np.isfinite(out.loc[5, "teff"])


def test_label_chunk_validates_shapes():
    with pytest.raises(ValueError, match=r"\(S, P\)"):
        catalog.label_chunk(np.ones((2, P)), np.ones((3, P)), meta_frame(2), stub_context())


def test_typed_frame_is_the_frame_astype_gives():
    """typed_frame skips pandas' per-column astype where an array has its dtype: the frame is
    that of ``pd.DataFrame(data).astype(columns)`` for arrays of the right dtype, of another
    dtype, lists, Series and strings, in the order of ``columns``."""
    from lamostcannon.labelling import empty_arrays, typed_frame

    cols = catalog.observation_columns()
    for n in (0, 1, 5):
        data = empty_arrays(cols, n)
        data["designation"] = np.array([f"LAMOST J{i:04d}" for i in range(n)], object)
        data["obsid"] = list(range(n))                         # a list
        data["n_pixels"] = np.arange(n, dtype=np.int64)        # int64 for an int32 column
        data["teff"] = pd.Series(np.linspace(4000, 6000, n))  # a Series
        data["converged"] = np.ones(n, np.int8)                # int8 for a bool column
        data = dict(reversed(list(data.items())))               # the columns' order wins
        pd.testing.assert_frame_equal(typed_frame(data, cols),
                                      pd.DataFrame(data)[list(cols)].astype(cols),
                                      check_exact=True)
        assert list(typed_frame(data, cols).columns) == list(cols)


# ------------------------------------------------------------------------------------------
# Part files and resumption logic
# ------------------------------------------------------------------------------------------

def test_plan_chunks_covers_rows_once():
    chunks = catalog.plan_chunks(10, 4)
    assert chunks == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    with pytest.raises(ValueError):
        catalog.plan_chunks(10, 0)


def test_rows_without_obsid_are_separate_stars_and_retired_rows_are_left_out(tmp_path):
    """Files without an OBSID card (obsid -1) are each their own star; rows the store retired
    (obsid -1 and no pixels) hold no observation; two known obsids may never repeat."""
    from lamostcannon.spectra import SpectraStore

    with SpectraStore.create(tmp_path / "s.zarr", chunk_rows=8) as store:
        store.append(np.ones((4, P), np.float32), np.ones((4, P), np.float32),
                     pd.DataFrame({"obsid": [5, -1, -1, -1], "designation": ["a", "", "", ""]}))
    meta = catalog.observation_metadata(catalog.StoreReader(tmp_path / "s.zarr"))
    assert meta["designation"].tolist() == ["a", "store-row1", "store-row2", "store-row3"]
    df = catalog._empty_frame(4)
    df["obsid"] = [5, -1, -1, -1]
    df["designation"] = meta["designation"]
    df["n_pixels"] = [3000, 3000, 0, 3000]  # row 2: retired by the store
    (tmp_path / "parts").mkdir()
    catalog.write_part(df, tmp_path / "parts", 0)
    table = catalog.assemble_observations(tmp_path / "parts", n_chunks=1, path=tmp_path / "o.parquet")
    assert list(table["designation"]) == ["a", "store-row1", "store-row3"]
    df["obsid"] = [5, 5, -1, -1]
    catalog.write_part(df, tmp_path / "parts", 0)
    with pytest.raises(RuntimeError, match="duplicated obsids"):
        catalog.assemble_observations(tmp_path / "parts", n_chunks=1, path=tmp_path / "o.parquet")


def test_parts_done_iff_file_exists(tmp_path):
    df = catalog._empty_frame(3)
    catalog.write_part(df, tmp_path, 7)
    (tmp_path / ".part-000002.parquet.999.tmp").write_bytes(b"half a file")  # a killed writer
    assert catalog.done_chunks(tmp_path) == {7}
    info = {"n_obs": 3, "chunk_size": 3}
    with pytest.raises(ValueError, match="no run.json"):
        catalog._prepare_parts_dir(tmp_path, info, overwrite=False)
    catalog._prepare_parts_dir(tmp_path, info, overwrite=True)
    assert catalog.done_chunks(tmp_path) == set() and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ValueError, match="chunk_size"):
        catalog._prepare_parts_dir(tmp_path, {"n_obs": 3, "chunk_size": 2}, overwrite=False)


# ------------------------------------------------------------------------------------------
# Repeats, Gaia, schema
# ------------------------------------------------------------------------------------------

def _obs_rows(rows):
    df = catalog._empty_frame(len(rows))
    for i, row in enumerate(rows):
        for key, value in row.items():
            df.loc[i, key] = value
    return df.astype(catalog.observation_columns())


def test_combine_repeats_snr_weighted_and_or_flags():
    obs = _obs_rows([
        dict(obsid=1, designation="A", snr_z=10.0, teff=5000.0, e_teff=100.0, fe_h=0.0,
             alpha_fe=0.1, ra=1.0, dec=2.0, fe_h_extrap=True),
        dict(obsid=2, designation="A", snr_z=30.0, teff=5400.0, e_teff=100.0, fe_h=-0.4,
             alpha_fe=np.nan, ra=1.0001, dec=2.0001),
        # a failed observation of A is not combined (A has good ones)
        dict(obsid=3, designation="A", snr_z=90.0, teff=np.nan, flag=catalog.FLAG_NO_PIXELS),
        # star B: two giant observations outweigh one dwarf observation
        dict(obsid=4, designation="B", snr_z=20.0, teff=4500.0, giantmodel=True, mg_fe=0.2),
        dict(obsid=5, designation="B", snr_z=20.0, teff=4700.0, giantmodel=True, mg_fe=0.4,
             kiel_extrap=True),
        dict(obsid=6, designation="B", snr_z=30.0, teff=5500.0, giantmodel=False, alpha_fe=0.3),
        # star C: only a non-converged observation -> kept, flagged
        dict(obsid=7, designation="C", snr_z=5.0, teff=6000.0, flag=catalog.FLAG_NOT_CONVERGED),
    ])
    stars = catalog.combine_repeats(obs).set_index("designation")
    assert list(stars.index) == ["A", "B", "C"]
    a, b, c = stars.loc["A"], stars.loc["B"], stars.loc["C"]
    assert a["teff"] == pytest.approx((10 * 5000 + 30 * 5400) / 40)
    assert a["fe_h"] == pytest.approx(-0.3)
    assert a["alpha_fe"] == pytest.approx(0.1)          # NaN values skipped
    assert a["e_teff"] == pytest.approx(np.hypot(10 * 100, 30 * 100) / 40)
    assert a["n_obs"] == 2 and a["n_obs_all"] == 3 and a["flag"] == 0
    assert a["fe_h_extrap"] and not a["kiel_extrap"]    # OR over observations
    assert a["obsid"] == 2 and a["ra"] == 1.0001        # best combined observation
    assert a["snr_z"] == pytest.approx(np.hypot(10, 30))
    assert b["giantmodel"] and b["n_obs"] == 2
    assert b["teff"] == pytest.approx(4600) and b["mg_fe"] == pytest.approx(0.3)
    assert np.isnan(b["alpha_fe"]) and b["kiel_extrap"]
    assert c["flag"] == catalog.FLAG_NOT_CONVERGED and c["teff"] == 6000


def test_combine_repeats_counts_a_repeated_row_once_and_names_missing_columns(caplog):
    rows = [dict(obsid=1, designation="A", snr_z=10.0, teff=5000.0, e_teff=100.0),
            dict(obsid=2, designation="A", snr_z=30.0, teff=5400.0, e_teff=100.0)]
    once = catalog.combine_repeats(_obs_rows(rows)).set_index("designation").loc["A"]
    # the second visit listed twice, and a row without a star: the same star, once each
    twice = _obs_rows(rows + [rows[1], dict(obsid=9, designation=None, snr_z=50.0)])
    with caplog.at_level("WARNING", logger="lamostcannon.catalog"):
        stars = catalog.combine_repeats(twice).set_index("designation")
    assert list(stars.index) == ["A"] and "2 of 4 observation rows skipped" in caplog.text
    again = stars.loc["A"]
    assert again["n_obs"] == once["n_obs"] == 2
    assert again["e_teff"] == pytest.approx(once["e_teff"])
    assert again["teff"] == pytest.approx(once["teff"])
    with pytest.raises(KeyError, match="snr_z"):
        catalog.combine_repeats(_obs_rows(rows).drop(columns="snr_z"))


def test_combine_repeats_prefers_recommended_and_propagates_calibrated_errors():
    from lamostcannon.labelling import QF_AT_BOUND, QF_LOW_SNR

    obs = _obs_rows([
        # star A: two recommended visits and a low-S/N one, which is not combined
        dict(obsid=1, designation="A", snr_z=40.0, teff=5000.0, e_teff=50.0, e_teff_random=30.0,
             e_teff_formal=10.0, snr=40.0, ood_score=1.0),
        dict(obsid=2, designation="A", snr_z=40.0, teff=5100.0, e_teff=50.0, e_teff_random=30.0,
             e_teff_formal=10.0, snr=30.0, ood_score=2.0),
        dict(obsid=3, designation="A", snr_z=5.0, teff=9000.0, e_teff=300.0,
             e_teff_random=290.0, e_teff_formal=100.0, snr=4.0, quality_flag=QF_LOW_SNR,
             ood_score=9.0),
        # star B: only flagged visits: combined, and their bits OR-ed (Cannon bits kept)
        dict(obsid=4, designation="B", snr_z=20.0, teff=4500.0, e_teff=80.0, e_teff_random=60.0,
             e_teff_formal=20.0, quality_flag=QF_AT_BOUND, cannon_flag=4),
        dict(obsid=5, designation="B", snr_z=20.0, teff=4700.0, e_teff=80.0, e_teff_random=60.0,
             e_teff_formal=20.0, quality_flag=QF_LOW_SNR, cannon_flag=64),
    ])
    stars = catalog.combine_repeats(obs).set_index("designation")
    a, b = stars.loc["A"], stars.loc["B"]
    assert a["n_obs"] == 2 and a["teff"] == pytest.approx(5050) and a["quality_flag"] == 0
    assert a["e_teff_random"] == pytest.approx(30 / np.sqrt(2))       # averages down
    floor = np.sqrt(50 ** 2 - 30 ** 2)                                  # does not
    assert a["e_teff"] == pytest.approx(np.hypot(30 / np.sqrt(2), floor))
    assert a["e_teff_formal"] == pytest.approx(10 / np.sqrt(2))
    assert a["snr"] == pytest.approx(50.0) and a["ood_score"] == 2.0
    assert b["n_obs"] == 2 and b["quality_flag"] == QF_AT_BOUND | QF_LOW_SNR
    assert b["cannon_flag"] == 4 | 64


def test_match_gaia_brightest_within_radius():
    gaia = pd.DataFrame({"source_id": [11, 12, 13, 14],
                         "ra": [10.0, 10.0 + 0.5 / 3600, 20.0, 30.0 + 2 / 3600],
                         "dec": [0.0, 0.0, 0.0, 0.0],
                         "phot_g_mean_mag": [15.0, 12.0, 14.0, 10.0]})
    ids = catalog.match_gaia([10.0, 20.0 + 0.3 / 3600, 30.0, np.nan], [0, 0, 0, 0], gaia)
    assert ids.tolist() == [12, 13, catalog.NO_SOURCE_ID, catalog.NO_SOURCE_ID]


def test_catalog_schema_and_round_trip(tmp_path):
    from astropy.table import Table

    obs = _obs_rows([dict(obsid=1, designation="J1", snr_z=20.0, teff=5000.0, ra=10.0, dec=0.0),
                     dict(obsid=2, designation="J2", snr_z=20.0, teff=4500.0, giantmodel=True,
                          ra=20.0, dec=0.0, mg_fe=0.1)])
    gaia = pd.DataFrame({"source_id": [7], "ra": [10.0], "dec": [0.0], "pmra": [1.0],
                         "pmdec": [-2.0], "phot_g_mean_mag": [12.0]})
    dist = pd.DataFrame({"source_id": [7], "r_est": [500.0]})
    table = catalog.build_catalog(obs, gaia=gaia, distances=dist, fits_path=tmp_path / "c.fits",
                                  parquet_path=tmp_path / "c.parquet")
    table1 = ["source_id", "designation", "giantmodel", "teff", "logg", "vmic", "kiel_extrap",
              "chi2", "fe_h", "fe_h_extrap", "o_fe", "chi2_o_fe", "o_fe_extrap"]
    assert table.colnames[:len(table1)] == table1
    for name in ("snr_z", "ra", "dec", "R", "phi", "z", "vR", "vT", "vz", "JR", "Jphi", "Jz",
                 *[f"chi2_{x}" for x in catalog.ABUNDANCE_LABELS]):
        assert name in table.colnames
    assert table["source_id"].tolist() == [7, catalog.NO_SOURCE_ID]
    assert np.isfinite(table["R"][0]) and np.isnan(table["R"][1])
    assert str(table["teff"].unit) == "K" and table["JR"].unit == "kpc km / s"
    assert "extrapolation" in table["fe_h_extrap"].description
    back = Table.read(tmp_path / "c.parquet")
    assert back.colnames == table.colnames and str(back["fe_h"].unit) == "dex"
    from lamostcannon.cleaning import read_table_fits

    fits = read_table_fits(tmp_path / "c.fits")
    assert fits.colnames == table.colnames and str(fits["fe_h"].unit) == "dex"
    assert fits["designation"].tolist() == ["J1", "J2"]


# ------------------------------------------------------------------------------------------
# The driver with real Cannon models on a real SpectraStore
# ------------------------------------------------------------------------------------------

N_OBS = 800
CHUNK = 8          # many small chunks, so that a kill lands mid-run


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """Trained dwarf and giant models on disk, a SpectraStore of N_OBS spectra drawn from them,
    and a LAMOST-like catalogue (some observations without LASP labels, repeats of stars)."""
    from astropy.table import Table

    from lamostcannon.spectra import SpectraStore

    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("survey")
    models = {}
    from lamostcannon import trust, validation

    for group, names in (("dwarf", labels.DWARF_LABELS), ("giant", labels.GIANT_LABELS)):
        model, lab, tflux = teacher(names, rng, return_data=True)
        model.write(root / f"model_{group}.fits")
        models[group] = (model, lab)
        # every calibration beside the model, so that the whole labelling core runs below
        cv = validation.cross_validate(lab[:240], tflux[:240], np.full((240, P), 1e4),
                                       list(names), k=3, seed=1, n_jobs=1,
                                       wavelength=model.wavelength)
        validation.write_boundaries(validation.extrapolation_boundaries(cv),
                                    root / f"extrapolation_{group}.json")
        trust.calibrate(model, cv, lab, fit_rows=cv["fold"].to_numpy() != 1,
                        model_path=root / f"model_{group}.fits")
    giant = rng.random(N_OBS) < 0.4
    truth = {}
    flux = np.empty((N_OBS, P), np.float32)
    for group, sel in (("dwarf", ~giant), ("giant", giant)):
        model, lab = models[group]
        draw = lab[rng.integers(0, len(lab), sel.sum())]
        flux[sel] = model.predict(draw) + 0.02 * rng.standard_normal((sel.sum(), P))
        truth[group] = (np.flatnonzero(sel), draw)
    ivar = np.full((N_OBS, P), 1 / 0.02 ** 2, np.float32)
    ivar[5] = 0.0                                        # an empty spectrum
    obsid = 10_000 + 3 * np.arange(N_OBS)
    star = np.where(np.arange(N_OBS) % 10 == 1, np.arange(N_OBS) - 1, np.arange(N_OBS))
    designation = np.array([f"J{s:06d}" for s in star])  # every 10th star observed twice
    with SpectraStore.create(root / "survey.zarr", chunk_rows=64) as store:
        store.append(flux, ivar, pd.DataFrame({"obsid": obsid, "designation": designation,
                                               "snrz": 50.0}))
    teff = np.where(giant, 4700.0, 5800.0)
    logg = np.where(giant, 2.5, 4.4)
    no_lasp = np.arange(N_OBS) % 25 == 3
    teff[no_lasp] = np.nan
    cat = Table({"obsid": obsid, "designation": designation, "ra": np.linspace(0, 50, N_OBS),
                 "dec": np.linspace(-10, 40, N_OBS), "snrz": rng.uniform(10, 100, N_OBS),
                 "rv": rng.normal(0, 40, N_OBS), "teff": teff, "logg": logg})
    cat.write(root / "lamost_catalog.fits")
    return SimpleNamespace(root=root, store=root / "survey.zarr", catalog=root / "lamost_catalog.fits",
                           giant=giant, truth=truth, no_lasp=no_lasp, n_chunks=-(-N_OBS // CHUNK))


def assert_same_rows(got, expected):
    """The rows of another process: every column but the floating-point ones exactly (obsids,
    flags, quality bits, model routing, names), the floating-point ones to 1e-9 relative: nothing
    makes another process's floating point bit-identical by construction (a Dask worker, for
    one, runs BLAS single-threaded), and one CI run saw 11 of 800 OOD scores of a Dask run differ
    from this process's in their last bits. Same columns, same order, same NaNs."""
    assert list(got.columns) == list(expected.columns)
    floats = [c for c in expected.columns if expected[c].dtype.kind == "f"]
    others = [c for c in expected.columns if c not in floats]
    pd.testing.assert_frame_equal(got[others], expected[others], check_exact=True)
    pd.testing.assert_frame_equal(got[floats], expected[floats], check_exact=False, rtol=1e-9,
                                  atol=0)


@pytest.fixture(scope="module")
def reference_run(survey):
    """An uninterrupted in-process run (n_workers=1), the reference of the other tests."""
    ctx = catalog.load_context(survey.root)
    parts = survey.root / "parts_reference"
    report = catalog.run_inference(survey.store, ctx, lamost_catalog=survey.catalog,
                                   parts_dir=parts, chunk_size=CHUNK, n_workers=1, progress=False)
    assert report.chunks_run == survey.n_chunks and report.executor == "serial"
    return catalog.read_parts(parts, survey.n_chunks)


def test_inference_recovers_labels_and_routes_models(survey, reference_run):
    obs = reference_run
    # the whole core ran: calibrated errors, S/N, the OOD score, quality_flag
    ctx = catalog.load_context(survey.root)
    assert all(b.errors is not None and b.ood is not None for b in ctx.models.values())
    fit = (obs["flag"] & catalog.FLAG_NO_PIXELS) == 0
    assert np.isfinite(obs.loc[fit, ["snr", "ood_score", "e_teff", "e_teff_random"]]).all().all()
    assert (obs.loc[fit, "e_teff"] >= obs.loc[fit, "e_teff_formal"]).all()
    assert obs.loc[5, "quality_flag"] & 512                          # FIT_FAILED: no pixels
    # spectra drawn from the models' own training labels are rarely unlike the training set
    assert ((obs["quality_flag"] & 64) != 0).mean() < 0.1
    assert len(obs) == N_OBS and obs["obsid"].is_unique and (obs["row"] == np.arange(N_OBS)).all()
    fitted = (obs["flag"] & catalog.FLAG_NO_PIXELS) == 0
    assert obs.loc[5, "flag"] & catalog.FLAG_NO_PIXELS and fitted.sum() == N_OBS - 1
    # eq. 1 routing where LASP labels exist, lower chi2 where they do not
    assert (obs["giantmodel"][fitted] == survey.giant[fitted]).all()
    assert ((obs["flag"] & catalog.FLAG_NO_LASP) != 0).to_numpy().tolist() == survey.no_lasp.tolist()
    for group in ("dwarf", "giant"):
        rows, truth = survey.truth[group]
        rows_ok = rows[rows != 5]
        truth = truth[rows != 5]
        names = labels.model_labels(group == "giant")
        got = obs.loc[rows_ok, list(names)].to_numpy()
        assert np.nanmedian(np.abs(got[:, 0] - truth[:, 0])) < 30      # teff, K
        assert np.nanmedian(np.abs(got[:, 3] - truth[:, 3])) < 0.03    # fe_h
        other = [n for n in catalog.ALL_LABELS if n not in names]
        assert obs.loc[rows_ok, other].isna().all().all()
        assert obs.loc[rows_ok, [f"chi2_{n}" for n in names if n.endswith("_fe")]].notna().all().all()
    assert obs["converged"][fitted].mean() > 0.95


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_rows(survey, reference_run):
    from distributed import Client, LocalCluster

    ctx = catalog.load_context(survey.root)
    parts = survey.root / "parts_dask"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        report = catalog.run_inference(survey.store, ctx, lamost_catalog=survey.catalog,
                                       parts_dir=parts, chunk_size=CHUNK, client=client,
                                       progress=False)
    assert report.executor == "dask" and report.n_workers == 2
    assert report.peak_memory_mb_per_worker > 0
    dask_rows = catalog.read_parts(parts, report.n_chunks)
    assert_same_rows(dask_rows, reference_run)


def test_run_inference_own_local_cluster_gives_the_same_rows(survey, reference_run):
    """n_workers=2 without a client: run_inference starts its own LocalCluster under
    LOCAL_CLUSTER_CONFIG (diagnostics sampled less often), which changes no row; the setting
    is scoped to the cluster's start, not left in this process's Dask config."""
    import dask
    import distributed  # noqa: F401  (its defaults enter dask.config on import)

    ctx = catalog.load_context(survey.root)
    parts = survey.root / "parts_own_cluster"
    before = {k: dask.config.get(k) for k in catalog.LOCAL_CLUSTER_CONFIG}
    report = catalog.run_inference(survey.store, ctx, lamost_catalog=survey.catalog,
                                   parts_dir=parts, chunk_size=CHUNK, n_workers=2,
                                   progress=False)
    assert report.executor == "dask-local" and report.n_workers == 2
    assert {k: dask.config.get(k) for k in catalog.LOCAL_CLUSTER_CONFIG} == before
    assert_same_rows(catalog.read_parts(parts, report.n_chunks), reference_run)


_KILL_SCRIPT = textwrap.dedent("""
    import sys
    from lamostcannon import catalog
    root, parts, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ctx = catalog.load_context(root)
    catalog.run_inference(root + "/survey.zarr", ctx, lamost_catalog=root + "/lamost_catalog.fits",
                          parts_dir=parts, chunk_size=chunk, n_workers=1, progress=False)
""")


@pytest.mark.slow
def test_resume_after_sigkill_is_identical(survey, reference_run):
    parts = survey.root / "parts_killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(survey.root), str(parts),
                             str(CHUNK)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(catalog.done_chunks(parts)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = len(catalog.done_chunks(parts))
    assert 3 <= done < survey.n_chunks, f"the kill did not land mid-run ({done} chunks done)"
    # a different chunking must not be mixed into these parts
    ctx = catalog.load_context(survey.root)
    with pytest.raises(ValueError, match="chunk_size"):
        catalog.run_inference(survey.store, ctx, lamost_catalog=survey.catalog, parts_dir=parts,
                              chunk_size=CHUNK + 1, n_workers=1, progress=False)
    # overwrite="changed" resumes the same run (its parts kept) ...
    report = catalog.run_inference(survey.store, ctx, lamost_catalog=survey.catalog,
                                   parts_dir=parts, chunk_size=CHUNK, n_workers=1, progress=False,
                                   overwrite="changed")
    assert report.chunks_done_before == done and report.chunks_run == survey.n_chunks - done
    resumed = catalog.read_parts(parts, survey.n_chunks)
    assert len(resumed) == N_OBS and resumed["obsid"].is_unique
    assert_same_rows(resumed, reference_run)
    # and the assembled Parquet file is the same table
    table = catalog.assemble_observations(parts, path=survey.root / "obs_resumed.parquet")
    assert_same_rows(pd.read_parquet(survey.root / "obs_resumed.parquet"), reference_run)
    assert str(table["teff"].unit) == "K"
    # ... and starts a different one again (here: another chunking) instead of refusing it
    again = catalog.run_inference(survey.store, ctx, lamost_catalog=survey.catalog,
                                  parts_dir=parts, chunk_size=CHUNK + 1, n_workers=1,
                                  progress=False, overwrite="changed")
    assert again.chunks_done_before == 0 and again.chunks_run == again.n_chunks
    rechunked = catalog.read_parts(parts, again.n_chunks)
    assert rechunked["obsid"].tolist() == reference_run["obsid"].tolist()
    # labels of another batching agree to the test step's convergence, not bit for bit
    np.testing.assert_allclose(rechunked["teff"], reference_run["teff"], rtol=1e-6)


def test_catalogue_from_inference_combines_repeats(survey, reference_run):
    table = catalog.build_catalog(reference_run, gaia=None, distances=None,
                                  fits_path=survey.root / "catalog.fits",
                                  parquet_path=survey.root / "catalog.parquet")
    n_stars = reference_run["designation"].nunique()
    assert len(table) == n_stars < N_OBS
    assert table["n_obs_all"].sum() == N_OBS
    assert np.all(table["designation"] == np.sort(np.asarray(table["designation"])))
