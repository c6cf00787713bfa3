"""The streaming per-star stages of lamostcannon.catalog (``build_catalog(stream=True)``,
``partition_observations``, ``assemble_observations(stream=True)``): the same rows, in the same
order, with the same values as the in-memory path; every visit of a star in one bucket; killed or
failed runs leave no half-written catalogue and resume from their buckets."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.table import Table

from lamostcannon import catalog, labels
from lamostcannon.cleaning import read_table_fits
from quadratic_teacher import teacher

P = 3909
N_OBS = 600
CHUNK = 16


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """Teacher models (simulate and recover), a store of N_OBS spectra drawn from them, labelled
    in parts; stars with 1-4 visits whose visits lie far apart in the store (so they span
    parts), a Gaia table and distances for most of them."""
    from lamostcannon.spectra import SpectraStore

    rng = np.random.default_rng(11)
    root = tmp_path_factory.mktemp("stream")
    models = {}
    for group, names in (("dwarf", labels.DWARF_LABELS), ("giant", labels.GIANT_LABELS)):
        model, lab = teacher(names, rng, n=300)
        model.write(root / f"model_{group}.fits")
        models[group] = (model, lab)
    n_stars = 250
    star = rng.integers(0, n_stars, N_OBS)                # repeats anywhere in the store
    giant_star = rng.random(n_stars) < 0.4
    flux = np.empty((N_OBS, P), np.float32)
    for group, is_giant in (("dwarf", False), ("giant", True)):
        sel = giant_star[star] == is_giant
        model, lab = models[group]
        draw = lab[rng.integers(0, len(lab), n_stars)][star[sel]]
        flux[sel] = model.predict(draw) + 0.02 * rng.standard_normal((sel.sum(), P))
    ivar = np.full((N_OBS, P), 1 / 0.02 ** 2, np.float32)
    ivar[7] = 0.0
    obsid = 50_000 + np.arange(N_OBS)
    designation = np.array([f"J{s:05d}" + ("+x" * (s % 3)) for s in star])  # varying widths
    with SpectraStore.create(root / "survey.zarr", chunk_rows=64) as store:
        store.append(flux, ivar, pd.DataFrame({"obsid": obsid, "designation": designation,
                                               "snrz": 40.0}))
    ra_star, dec_star = rng.uniform(0, 360, n_stars), rng.uniform(-20, 60, n_stars)
    cat = Table({"obsid": obsid, "designation": designation,
                 "ra": ra_star[star] + rng.normal(0, 1e-5, N_OBS), "dec": dec_star[star],
                 "snrz": rng.uniform(5, 120, N_OBS), "rv": rng.normal(0, 40, N_OBS),
                 "teff": np.where(giant_star[star], 4700.0, 5800.0),
                 "logg": np.where(giant_star[star], 2.5, 4.4)})
    cat["teff"][::31] = np.nan                             # chosen by chi2
    cat.write(root / "lamost_catalog.fits")
    ctx = catalog.load_context(root)
    parts = root / "parts"
    catalog.run_inference(root / "survey.zarr", ctx, lamost_catalog=root / "lamost_catalog.fits",
                          parts_dir=parts, chunk_size=CHUNK, n_workers=1, progress=False)
    has = rng.random(n_stars) < 0.85
    ids = 1000 + np.arange(n_stars)
    gaia = pd.DataFrame({"source_id": ids[has], "ra": ra_star[has], "dec": dec_star[has],
                         "pmra": rng.normal(0, 5, has.sum()), "pmdec": rng.normal(0, 5, has.sum()),
                         "phot_g_mean_mag": rng.uniform(10, 16, has.sum())})
    distances = pd.DataFrame({"source_id": ids[has], "r_est": rng.uniform(200, 3000, has.sum())})
    obs = catalog.read_parts(parts)
    return {"root": root, "parts": parts, "obs": obs, "gaia": gaia, "distances": distances,
            "ctx": ctx}


def assert_tables_equal(a, b, rtol=1e-12):
    """Same columns, units, descriptions, meta; ints, strings, bools exact; floats within rtol
    (the streaming path runs the same operations per star, but bit identity is not promised)."""
    assert a.colnames == b.colnames
    assert len(a) == len(b)
    assert a.meta == b.meta
    for name in a.colnames:
        assert a[name].dtype == b[name].dtype, name
        assert str(a[name].unit) == str(b[name].unit) and a[name].description == b[name].description
        x, y = np.asarray(a[name]), np.asarray(b[name])
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=rtol, atol=0, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


def test_streaming_catalogue_equals_in_memory(survey, tmp_path):
    root = survey["root"]
    kw = dict(gaia=survey["gaia"], distances=survey["distances"], ctx=survey["ctx"])
    memory = catalog.build_catalog(survey["obs"], fits_path=tmp_path / "m.fits",
                                   parquet_path=tmp_path / "m.parquet", **kw)
    result = catalog.build_catalog(survey["parts"], fits_path=tmp_path / "s.fits",
                                   parquet_path=tmp_path / "s.parquet", bucket_dir=root / "b",
                                   bucket_rows=60, track_memory=True, **kw)
    assert isinstance(result, catalog.CatalogStream)
    assert result.n_buckets >= 8 and result.n_stars == len(memory)
    assert set(result.stage_seconds) == {"partition", "combine", "gaia", "kinematics", "table1"}
    assert all(v > 0 for v in result.stage_peak_rss_mb.values())
    # the science is there: repeats combined once, Gaia matches and kinematics
    assert memory["n_obs_all"].sum() == N_OBS and len(memory) < N_OBS
    assert (memory["source_id"] >= 0).mean() > 0.7 and np.isfinite(memory["JR"]).mean() > 0.5
    assert list(memory["designation"]) == sorted(memory["designation"])
    assert_tables_equal(memory, Table.read(tmp_path / "s.parquet"))
    assert_tables_equal(Table.read(tmp_path / "m.parquet"), Table.read(tmp_path / "s.parquet"))
    assert_tables_equal(read_table_fits(tmp_path / "m.fits"), read_table_fits(tmp_path / "s.fits"))
    with fits.open(tmp_path / "m.fits") as hm, fits.open(tmp_path / "s.fits") as hs:
        assert hm[1].header.tostring() == hs[1].header.tostring()   # NAXIS2, widths, cards
        assert hs[1].data.shape == (len(memory),)
    assert_tables_equal(memory, result.read())
    assert not list(tmp_path.glob(".*tmp*"))
    assert {p.name for p in (root / "b").glob(".*")} <= {".lock"}


def test_every_visit_of_a_star_lands_in_one_bucket_in_designation_order(survey, tmp_path):
    obs = survey["obs"].iloc[::-1].reset_index(drop=True)        # visits in another order
    manifest = catalog.partition_observations(obs, tmp_path, bucket_rows=40, batch_rows=25)
    frames = [catalog.read_bucket(tmp_path / b["file"]) for b in manifest["buckets"]]
    assert len(frames) >= 10 and not manifest["resumed"]
    assert sum(len(f) for f in frames) == len(obs) == manifest["n_obs"]
    seen = [set(f["designation"]) for f in frames]
    assert sum(len(s) for s in seen) == len(set().union(*seen))   # no star in two buckets
    for a, b in zip(seen, seen[1:]):
        if a and b:
            assert max(a) < min(b)
    for f in frames:                  # input order kept within a bucket
        pos = pd.Index(obs["obsid"]).get_indexer(f["obsid"])
        assert (np.diff(pos) > 0).all()
    # a shuffled frame through the streaming path: the rows of the in-memory path
    memory = catalog.build_catalog(obs, fits_path=False, parquet_path=False, gaia=None,
                                   distances=None, ctx=survey["ctx"])
    result = catalog.build_catalog(obs, fits_path=False, parquet_path=tmp_path / "c.parquet",
                                   gaia=None, distances=None, ctx=survey["ctx"], stream=True,
                                   bucket_dir=tmp_path / "b2", bucket_rows=33)
    assert_tables_equal(memory, result.read())


def test_streamed_assembly_equals_in_memory(survey, tmp_path):
    table = catalog.assemble_observations(survey["parts"], path=tmp_path / "m.parquet")
    path = catalog.assemble_observations(survey["parts"], path=tmp_path / "s.parquet",
                                         stream=True)
    assert path == tmp_path / "s.parquet"
    assert_tables_equal(table, Table.read(path), rtol=0)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "m.parquet"), pd.read_parquet(path),
                                  check_exact=True)
    import pyarrow.parquet as pq

    assert pq.ParquetFile(path).metadata.num_row_groups == -(-N_OBS // CHUNK)
    # the streamed file is a streaming input too, with the rows of the parts
    a = catalog.build_catalog(path, fits_path=False, parquet_path=tmp_path / "a.parquet",
                              gaia=None, distances=None, bucket_dir=tmp_path / "b", bucket_rows=100)
    b = catalog.build_catalog(survey["parts"], fits_path=False, parquet_path=tmp_path / "b.parquet",
                              gaia=None, distances=None, bucket_dir=tmp_path / "b", bucket_rows=100)
    assert not a.buckets_resumed and not b.buckets_resumed   # another input: rebuilt
    assert_tables_equal(a.read(), b.read(), rtol=0)


def test_failed_run_leaves_old_catalogue_and_resumes_from_buckets(survey, tmp_path, monkeypatch):
    kw = dict(gaia=survey["gaia"], distances=survey["distances"], ctx=survey["ctx"],
              fits_path=tmp_path / "c.fits", parquet_path=tmp_path / "c.parquet",
              bucket_dir=tmp_path / "b", bucket_rows=100)
    (tmp_path / "c.fits").write_bytes(b"old")
    (tmp_path / "c.parquet").write_bytes(b"old")
    dead = tmp_path / ".c.999999999.tmp.fits"      # left by a killed run (no such process)
    dead.write_bytes(b"half")
    calls = {"n": 0}
    real = catalog.add_kinematics

    def failing(stars, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("killed in the third bucket")
        return real(stars, *args, **kwargs)

    monkeypatch.setattr(catalog, "add_kinematics", failing)
    with pytest.raises(MemoryError):
        catalog.build_catalog(survey["parts"], **kw)
    assert (tmp_path / "c.fits").read_bytes() == b"old" == (tmp_path / "c.parquet").read_bytes()
    assert not dead.exists()
    assert sorted(p.name for p in tmp_path.glob(".*tmp*")) == []
    monkeypatch.setattr(catalog, "add_kinematics", real)
    # a bucket file lost after the manifest: rebuilt, not trusted
    manifest = json.loads((tmp_path / "b" / catalog.BUCKET_MANIFEST).read_text())
    result = catalog.build_catalog(survey["parts"], **kw)
    assert result.buckets_resumed
    (tmp_path / "b" / manifest["buckets"][1]["file"]).unlink()
    again = catalog.build_catalog(survey["parts"], **kw)
    assert not again.buckets_resumed
    memory = catalog.build_catalog(survey["obs"], gaia=survey["gaia"],
                                   distances=survey["distances"], ctx=survey["ctx"],
                                   fits_path=tmp_path / "m.fits", parquet_path=False)
    assert_tables_equal(memory, result.read())
    assert_tables_equal(read_table_fits(tmp_path / "m.fits"), read_table_fits(tmp_path / "c.fits"))


def test_partition_killed_midway_is_rebuilt(survey, tmp_path):
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, signal
        from lamostcannon import catalog
        real = catalog._ParquetTableWriter.write
        def write(self, table):   # die (SIGKILL) while the catalogue is being written
            real(self, table)
            os.kill(os.getpid(), signal.SIGKILL)
        catalog._ParquetTableWriter.write = write
        catalog.build_catalog({str(survey['parts'])!r}, gaia=None, distances=None,
                              fits_path={str(tmp_path / 'c.fits')!r},
                              parquet_path={str(tmp_path / 'c.parquet')!r},
                              bucket_dir={str(tmp_path / 'b')!r}, bucket_rows=100)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (tmp_path / "c.fits").exists() and not (tmp_path / "c.parquet").exists()
    assert list(tmp_path.glob(".c.*.tmp*"))                 # the killed run's temporary files
    result = catalog.build_catalog(survey["parts"], gaia=None, distances=None,
                                   fits_path=tmp_path / "c.fits", parquet_path=tmp_path / "c.parquet",
                                   bucket_dir=tmp_path / "b", bucket_rows=100)
    assert result.buckets_resumed                            # the buckets were complete
    assert not list(tmp_path.glob(".c.*.tmp*"))              # and the dead run's temps removed
    memory = catalog.build_catalog(survey["obs"], gaia=None, distances=None, fits_path=False,
                                   parquet_path=False)
    assert_tables_equal(memory, result.read())
    # buckets half written (no manifest): rebuilt from the input
    (tmp_path / "b" / catalog.BUCKET_MANIFEST).unlink()
    (tmp_path / "b" / "bucket-00000.arrows").write_bytes(b"half")
    again = catalog.build_catalog(survey["parts"], gaia=None, distances=None, fits_path=False,
                                  parquet_path=tmp_path / "c.parquet", bucket_dir=tmp_path / "b",
                                  bucket_rows=100)
    assert not again.buckets_resumed
    assert_tables_equal(memory, again.read())


def test_streaming_calibration_hook_and_edge_cases(survey, tmp_path, rng):
    from test_calibration import LABEL, simulate

    from lamostcannon import calibration

    cal = calibration.fit(simulate(rng), [LABEL], seed=1, n_boot=10)
    obs = survey["obs"]
    memory = catalog.build_catalog(obs, fits_path=tmp_path / "m.fits", parquet_path=False,
                                   gaia=None, distances=None, calibration=cal)
    result = catalog.build_catalog(obs, fits_path=tmp_path / "c.fits", parquet_path=False,
                                   gaia=None, distances=None, calibration=cal, stream=True,
                                   bucket_dir=tmp_path / "b", bucket_rows=150)
    assert f"{LABEL}_cal" in memory.colnames and result.parquet_path is None
    assert_tables_equal(read_table_fits(tmp_path / "m.fits"), read_table_fits(tmp_path / "c.fits"))
    # a calibration file: read once, applied to every bucket
    path = cal.write(tmp_path / "cal.json")
    by_file = catalog.build_catalog(obs, fits_path=False, parquet_path=tmp_path / "f.parquet",
                                    gaia=None, distances=None, calibration=path, stream=True,
                                    bucket_dir=tmp_path / "b", bucket_rows=150).read()
    assert by_file.meta["calibration"]["file"] == str(path)
    np.testing.assert_allclose(by_file[f"{LABEL}_cal"], memory[f"{LABEL}_cal"], rtol=1e-12,
                               equal_nan=True)
    assert np.isfinite(by_file[f"{LABEL}_cal"]).any()
    # no observations: the empty catalogue of the in-memory path
    empty = catalog._empty_frame(0)
    none = catalog.build_catalog(empty, fits_path=False, parquet_path=tmp_path / "e.parquet",
                                 gaia=None, distances=None, stream=True, bucket_dir=tmp_path / "e")
    assert none.n_stars == 0 and len(none.read()) == 0
    with pytest.raises(ValueError, match="not both False"):
        catalog.build_catalog(empty, fits_path=False, parquet_path=False, stream=True)
    with pytest.raises(ValueError, match="bucket_rows"):
        catalog.partition_observations(obs, tmp_path / "x", bucket_rows=0)
