"""lamostcannon.store: the Zarr spectra store and the parallel, resumable ingest.

Synthetic rows for the store mechanics; the real DR10 files (``real_lamost`` fixture) for ingest:
exact agreement with per-file processing, corrupted copies reported and not fatal, and a real
``kill -9`` in the middle of an ingest followed by a resume.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest

from lamostcannon import spectra as sp
from lamostcannon.store import META_COLUMNS, SpectraStore, StoreBusy, ingest

P = sp.N_PIXELS


def rows(n, start=0, rng=None):
    rng = rng or np.random.default_rng(start)
    flux = rng.normal(1, 0.05, (n, P)).astype(np.float32)
    ivar = rng.uniform(0, 400, (n, P)).astype(np.float32)
    meta = pd.DataFrame({"obsid": np.arange(start, start + n),
                         "filename": [f"f{i}.fits" for i in range(start, start + n)]})
    return flux, ivar, meta


# ------------------------------------------------------------------------------ store mechanics

def test_store_round_trip_read_meta_and_dask(tmp_path):
    path = tmp_path / "s.zarr"
    with SpectraStore.create(path, chunk_rows=8) as store:
        f1, i1, m1 = rows(13)
        f2, i2, m2 = rows(7, start=13)
        assert store.append(f1, i1, m1) == range(0, 13)
        assert store.append(f2, i2, m2) == range(13, 20)
        store.compact()
    flux, ivar = np.concatenate([f1, f2]), np.concatenate([i1, i2])
    store = SpectraStore(path)  # read-only
    assert len(store) == 20 and store.chunk_rows == 8
    assert list(store.meta.columns) == list(META_COLUMNS)
    assert store.meta["obsid"].tolist() == list(range(20))
    assert store.meta.loc[3, "designation"] == "" and np.isnan(store.meta.loc[3, "z"])
    f, i = store.read()
    np.testing.assert_array_equal(f, flux)
    np.testing.assert_array_equal(i, ivar)
    f, i = store.read([17, 2, 2, -1])
    np.testing.assert_array_equal(f, flux[[17, 2, 2, 19]])
    np.testing.assert_array_equal(store.read(5)[1], ivar[5])
    np.testing.assert_array_equal(store.read(slice(3, 15, 4))[0], flux[3:15:4])
    np.testing.assert_array_equal(store.read(np.arange(20) % 3 == 0)[0], flux[::3])
    with pytest.raises(IndexError):
        store.read([20])
    np.testing.assert_array_equal(store.rows_for([5, 99, 13]), [5, -1, 13])
    dflux, divar = store.to_dask()
    assert dflux.shape == (20, P) and dflux.chunks[0] == (8, 8, 4)
    np.testing.assert_array_equal(divar.compute(), ivar)
    assert float(dflux.sum().compute()) == pytest.approx(float(flux.sum(dtype=np.float64)),
                                                         rel=1e-6)
    np.testing.assert_allclose(store.wavelength, sp.common_wavelength())
    with pytest.raises(PermissionError):
        store.append(f1, i1, m1)
    with pytest.raises(ValueError, match=r"shape \(K, 3909\)"):
        SpectraStore(path, "a").append(f1[:, :10], i1[:, :10], m1)


def test_row_ranges_decoded_from_the_chunk_files_are_zarrs_values(tmp_path):
    """store.read(slice) decodes the chunk files itself (_read_slice): the same bits as Zarr's
    read for every range (whole chunks, partial ones at both ends, the short last chunk); a
    missing chunk file is Zarr's fill value; a chunk file of the wrong size or cut short is
    StoreDamaged."""
    from lamostcannon.store import StoreDamaged, _direct_layout, _read_slice

    path = tmp_path / "s.zarr"
    with SpectraStore.create(path, chunk_rows=8) as store:
        f, i, m = rows(21)
        f[3, 7], i[4, 8] = np.nan, -np.inf
        store.append(f, i, m)
    store = SpectraStore(path)
    assert _direct_layout(store.flux) is not None
    for a in range(0, 22, 3):
        for b in range(a, 22, 2):
            for arr, want in ((store.flux, f), (store.ivar, i)):
                got = _read_slice(arr, a, b)
                assert got.dtype == np.float32 and got.shape == (b - a, P)
                np.testing.assert_array_equal(got.view(np.uint32), arr[a:b].view(np.uint32))
                np.testing.assert_array_equal(got.view(np.uint32), want[a:b].view(np.uint32))
    folder, _, key = _direct_layout(store.flux)
    (folder / key((1, 0))).unlink()                       # rows 8-15: Zarr's fill value
    np.testing.assert_array_equal(store.read(slice(5, 19))[0], store.flux[5:19])
    from numcodecs import blosc

    (folder / key((0, 0))).write_bytes(blosc.compress(np.ones((4, P), np.float32), b"lz4", 5))
    with pytest.raises(StoreDamaged, match="does not hold 8 rows"):
        store.read(slice(0, 4))
    chunk = folder / key((2, 0))
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(StoreDamaged, match="cannot read rows"):
        store.read(slice(16, 21))


def test_an_interrupted_append_is_rolled_back_on_reopen(tmp_path):
    """A partially written append: data rows and a metadata part, but no commit."""
    path = tmp_path / "s.zarr"
    f1, i1, m1 = rows(10)
    with SpectraStore.create(path, chunk_rows=4) as store:
        store.append(f1, i1, m1)
        # simulate a crash between steps 1-2 and 3 of an append
        for arr in (store.flux, store.ivar):
            arr.resize((16, P))
            arr[10:16] = -7.0
        (path / "meta" / "part-000000000010-deadbeef.parquet").write_bytes(b"partial")
    assert len(SpectraStore(path)) == 10  # readers see the committed rows only
    with SpectraStore(path, "a") as store:
        assert store.flux.shape == (10, P)
        assert not (path / "meta" / "part-000000000010-deadbeef.parquet").exists()
        f2, i2, m2 = rows(5, start=10)
        store.append(f2, i2, m2)
    store = SpectraStore(path)
    np.testing.assert_array_equal(store.read()[0], np.concatenate([f1, f2]))
    assert store.meta["obsid"].tolist() == list(range(15))


def test_one_writer_at_a_time_in_one_process_too(tmp_path):
    path = tmp_path / "s.zarr"
    writer = SpectraStore.create(path)
    with pytest.raises(StoreBusy, match="open for writing by another process"):
        SpectraStore(path, "a")
    SpectraStore(path)  # readers are not blocked
    writer.close()
    with SpectraStore(path, "a"):
        pass
    assert (path / ".lock").exists()  # the lock file stays; the OS lock is what counts
    with pytest.raises(FileNotFoundError):
        SpectraStore(tmp_path / "nothing.zarr")


def test_create_refuses_what_it_should_and_replaces_only_an_idle_store(tmp_path):
    path = tmp_path / "s.zarr"
    SpectraStore.create(path).close()
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        SpectraStore.create(path)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    for target in (other, other / "keep.txt"):
        with pytest.raises(FileExistsError, match="is not a SpectraStore"):
            SpectraStore.create(target, overwrite=True)
        with pytest.raises(FileExistsError, match="is not a SpectraStore"):
            ingest([], target, progress=False)
    assert (other / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    SpectraStore.create(empty).close()  # an empty folder is fine
    assert len(SpectraStore(empty)) == 0
    with SpectraStore(path, "a") as busy:
        busy.append(*rows(3)[:2], rows(3)[2])
        with pytest.raises(StoreBusy):
            SpectraStore.create(path, overwrite=True)
    assert len(SpectraStore(path)) == 3
    SpectraStore.create(path, overwrite=True).close()
    assert len(SpectraStore(path)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notes", "s.zarr"]  # no litter


# ------------------------------------------------------------------------------ ingest, real files

@pytest.fixture(scope="module")
def dr10_store(real_lamost, tmp_path_factory):
    """All 1726 real DR10 files ingested on two worker processes."""
    path = tmp_path_factory.mktemp("ingest") / "dr10.zarr"
    files = sorted((real_lamost / "dr10").glob("*.fits.gz"))
    report = ingest(real_lamost / "dr10", path, n_workers=2, chunk_size=32, commit_rows=512,
                    progress=False)
    return path, files, report


def test_ingest_of_all_dr10_files_equals_per_file_processing(dr10_store, real_lamost):
    path, files, report = dr10_store
    assert len(report) == 1726 and (report["status"] == "stored").all()
    assert report["row"].tolist() == list(range(1726))
    assert (path / "ingest_report.csv").is_file()
    store = SpectraStore(path)
    assert len(store) == 1726
    meta = store.meta
    assert meta["filename"].tolist() == [p.name for p in files]
    cat = pd.read_csv(real_lamost / "dr10" / "catalog.csv").set_index("filename")
    assert (meta["obsid"].to_numpy() == cat.loc[meta["filename"], "obsid"].to_numpy()).all()
    assert meta["obsid"].is_unique and (meta["n_good"] > 2500).all()
    flux, ivar = store.read()
    for k, f in enumerate(files):
        expect_f, expect_i = sp.preprocess(sp.read_lamost(f))
        np.testing.assert_array_equal(flux[k], expect_f, err_msg=f.name)
        np.testing.assert_array_equal(ivar[k], expect_i, err_msg=f.name)


def test_ingest_again_skips_every_stored_file(dr10_store):
    path, files, _ = dr10_store
    report = ingest(files[:40] + files[:3], path, n_workers=1, progress=False)
    assert (report["status"] == "already_stored").all()
    assert report["row"].tolist() == list(range(40)) + [0, 1, 2]
    assert len(SpectraStore(path)) == 1726


def _corrupt_copies(real_lamost, tmp_path):
    """Broken versions of real files, keyed by path, with the reason expected in the report."""
    from astropy.io import fits

    src = sorted((real_lamost / "dr10").glob("*.fits.gz"))[-5:]
    broken = {}
    gz = src[0].read_bytes()
    (tmp_path / "truncated.fits.gz").write_bytes(gz[: len(gz) * 2 // 3])
    broken[tmp_path / "truncated.fits.gz"] = "truncated gzip"
    flipped = bytearray(gz)
    for k in range(2000, 2010):
        flipped[k] ^= 0x5A
    (tmp_path / "flipped.fits.gz").write_bytes(bytes(flipped))
    broken[tmp_path / "flipped.fits.gz"] = "gzip"
    raw = bytearray(gzip.decompress(src[1].read_bytes()))
    raw[2880 + 80 * 3:2880 + 80 * 3 + 8] = b"\x00\x01\x02\x03\x04\x05\x06\x07"
    (tmp_path / "header.fits").write_bytes(bytes(raw))
    broken[tmp_path / "header.fits"] = "unreadable header"
    with fits.open(src[2]) as hdul:
        header = hdul[0].header.copy()
        del header["NAXIS1"], header["NAXIS2"]
        fits.PrimaryHDU(header=header).writeto(tmp_path / "nohdu.fits")
        broken[tmp_path / "nohdu.fits"] = "missing HDU"
        table = hdul[1].copy()
        table.data["IVAR"][:] = 0
        fits.HDUList([fits.PrimaryHDU(header=header), table]).writeto(tmp_path / "ivar0.fits")
        broken[tmp_path / "ivar0.fits"] = "no valid pixels"
        table = hdul[1].copy()
        table.data["WAVELENGTH"][0, 50] = np.inf
        fits.HDUList([fits.PrimaryHDU(header=header), table]).writeto(tmp_path / "infwave.fits")
        broken[tmp_path / "infwave.fits"] = "NaN/inf wavelengths"
        table = hdul[1].copy()
        table.data["WAVELENGTH"][0] = table.data["WAVELENGTH"][0][::-1]
        fits.HDUList([fits.PrimaryHDU(header=header), table]).writeto(tmp_path / "reverse.fits")
        broken[tmp_path / "reverse.fits"] = "not strictly increasing"
    (tmp_path / "empty.fits.gz").write_bytes(b"")
    broken[tmp_path / "empty.fits.gz"] = "not a FITS file"
    return broken


def test_corrupted_files_are_reported_and_the_good_ones_around_them_stored(real_lamost,
                                                                           tmp_path):
    good = sorted((real_lamost / "dr10").glob("*.fits.gz"))[:60]
    broken = _corrupt_copies(real_lamost, tmp_path)
    duplicate = tmp_path / "copy_of_first.fits.gz"  # same obsid under another name
    duplicate.write_bytes(good[0].read_bytes())
    files = list(good[:20]) + list(broken)[:4] + list(good[20:40]) + [duplicate] \
        + list(broken)[4:] + list(good[40:])
    store_path = tmp_path / "s.zarr"
    report = ingest(files, store_path, n_workers=2, chunk_size=4, commit_rows=16, chunk_rows=8,
                    progress=False).set_index("source")
    for path, reason in broken.items():
        row = report.loc[str(path)]
        assert row["status"] == "failed" and reason in row["reason"], (path.name, row["reason"])
    assert report.loc[str(duplicate), "status"] == "duplicate"
    assert (report.loc[[str(p) for p in good], "status"] == "stored").all()
    on_disk = pd.read_csv(store_path / "ingest_report.csv")
    assert len(on_disk) == len(files) and (on_disk["status"] == "failed").sum() == len(broken)
    store = SpectraStore(store_path)
    assert store.meta["filename"].tolist() == [p.name for p in good]
    flux, ivar = store.read([0, 59])
    np.testing.assert_array_equal(flux[1], sp.preprocess(sp.read_lamost(good[59]))[0])


def test_formats_folder_ingests_every_layout(real_lamost, tmp_path):
    report = ingest(real_lamost / "formats", tmp_path / "s.zarr", n_workers=1, progress=False)
    assert (report["status"] == "stored").all() and len(report) == 3
    meta = SpectraStore(tmp_path / "s.zarr").meta
    assert sorted(meta["layout"]) == ["dr1-3", "dr4-9", "dr4-9"]
    assert sorted(meta["data_release"]) == ["DR1-3", "DR6", "DR7"]


KILLED_INGEST = textwrap.dedent("""
    import sys
    from lamostcannon.store import ingest
    if __name__ == "__main__":
        ingest(sys.argv[1], sys.argv[2], n_workers=1, chunk_size=8, commit_rows=32,
               chunk_rows=16, progress=False)
""")


def test_resume_after_kill_9_loses_and_duplicates_nothing(real_lamost, tmp_path):
    store_path = tmp_path / "s.zarr"
    script = tmp_path / "run.py"
    script.write_text(KILLED_INGEST)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, str(script), str(real_lamost / "dr10"),
                             str(store_path)], env=env)
    commit = store_path / "COMMIT.json"
    deadline = time.monotonic() + 120
    committed = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            committed = json.loads(commit.read_text())["n_rows"]
        except (OSError, ValueError):
            pass
        if committed >= 96:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the ingest ended before it could be killed"
    before = SpectraStore(store_path)
    n_before = len(before)
    assert 96 <= n_before < 1726
    assert (store_path / ".lock").exists()  # the killed writer's lock file (the OS lock is gone)

    report = ingest(real_lamost / "dr10", store_path, n_workers=2, progress=False)
    assert (report["status"] == "already_stored").sum() == n_before
    assert (report["status"] == "stored").sum() == 1726 - n_before
    store = SpectraStore(store_path)
    assert len(store) == 1726 and store.meta["obsid"].is_unique
    files = sorted((real_lamost / "dr10").glob("*.fits.gz"))
    assert store.meta["filename"].tolist() == [p.name for p in files]
    assert store.flux.shape == (1726, P)
    flux, ivar = store.read()
    for k in list(range(n_before - 3, n_before + 3)) + [0, 1725]:
        f, i = sp.preprocess(sp.read_lamost(files[k]))
        np.testing.assert_array_equal(flux[k], f)
        np.testing.assert_array_equal(ivar[k], i)


def test_a_failed_append_in_the_writer_thread_stops_the_ingest_and_a_rerun_completes(
        real_lamost, tmp_path, monkeypatch):
    """Appends run in a background thread; an append that fails (disk full) stops the ingest
    with that error, keeps what was committed before it, and the next run stores the rest."""
    files = sorted((real_lamost / "dr10").glob("*.fits.gz"))[:70]
    original = SpectraStore.append
    calls = {"n": 0}

    def append_or_fail(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SpectraStore, "append", append_or_fail)
    path = tmp_path / "s.zarr"
    with pytest.raises(OSError, match="No space left on device"):
        ingest(files, path, n_workers=1, chunk_size=16, commit_rows=32, progress=False)
    monkeypatch.undo()
    assert len(SpectraStore(path)) == 32  # the first commit, nothing after the failure
    report = ingest(files, path, n_workers=1, chunk_size=16, commit_rows=32, progress=False)
    assert (report["status"] == "already_stored").sum() == 32
    assert (report["status"] == "stored").sum() == 38
    store = SpectraStore(path)
    assert store.meta["filename"].tolist() == [f.name for f in files]
    flux, ivar = store.read([0, 40, 69])
    for k, row in zip((0, 40, 69), range(3)):
        expect_f, expect_i = sp.preprocess(sp.read_lamost(files[k]))
        np.testing.assert_array_equal(flux[row], expect_f)
        np.testing.assert_array_equal(ivar[row], expect_i)


# --------------------------------------------- changed source files (a mock regenerated in place)

def _copies(real_lamost, folder, n):
    """``n`` real DR10 files copied to ``folder`` as s0.fits.gz ... (distinct obsids), and the
    originals (to rewrite a copy with another file's bytes)."""
    originals = sorted((real_lamost / "dr10").glob("*.fits.gz"))[:n + 3]
    folder.mkdir()
    copies = []
    for k in range(n):
        dst = folder / f"s{k}.fits.gz"
        dst.write_bytes(originals[k].read_bytes())
        copies.append(dst)
    return copies, originals


def _rewrite(path, data: bytes, bump_ns: int = 10**9):
    """Write ``data`` to ``path`` under the same name, with a later modification time."""
    old = path.stat().st_mtime_ns
    path.write_bytes(data)
    os.utime(path, ns=(old + bump_ns, old + bump_ns))


def _assert_row_is(store, row, path):
    f, i = store.read(row)
    expect_f, expect_i = sp.preprocess(sp.read_lamost(path))
    np.testing.assert_array_equal(f, expect_f)
    np.testing.assert_array_equal(i, expect_i)


def test_a_source_rewritten_under_its_name_is_read_again_into_its_row(real_lamost, tmp_path):
    """The bug of a stale interim store: files regenerated under the same names were skipped
    by path, and the store served the old spectra. Now a changed file replaces its row; an
    unchanged one is skipped; nothing is duplicated or lost; the catalogue can tell."""
    copies, originals = _copies(real_lamost, tmp_path / "src", 6)
    path = tmp_path / "s.zarr"
    first = ingest(copies, path, n_workers=1, chunk_size=2, commit_rows=4, chunk_rows=4,
                   progress=False).set_index("source")
    assert (first["status"] == "stored").all()
    st = os.stat(copies[0])
    meta = SpectraStore(path).meta
    assert meta.loc[0, "source_size"] == st.st_size
    assert meta.loc[0, "source_mtime_ns"] == st.st_mtime_ns
    assert SpectraStore(path).revision == 0
    _rewrite(copies[0], copies[0].read_bytes())          # touched: same bits, new fingerprint
    touched = ingest(copies, path, n_workers=1, progress=False).set_index("source")
    assert touched.loc[str(copies[0]), "reason"].startswith("replaced row 0")
    store = SpectraStore(path)
    assert store.revision == 0                           # rows unchanged: labels stay valid
    assert store.meta.loc[0, "source_mtime_ns"] == copies[0].stat().st_mtime_ns

    _rewrite(copies[2], originals[7].read_bytes())       # another star under the same name
    _rewrite(copies[4], copies[4].read_bytes())          # same bytes, rewritten: same obsid
    again = ingest(copies, path, n_workers=2, chunk_size=2, commit_rows=4,
                   progress=False).set_index("source")
    changed = [str(copies[2]), str(copies[4])]
    assert (again.loc[changed, "status"] == "stored").all()
    assert again.loc[changed, "reason"].str.startswith("replaced row").all()
    assert again.loc[changed, "row"].tolist() == first.loc[changed, "row"].tolist()
    unchanged = [str(c) for k, c in enumerate(copies) if k not in (2, 4)]
    assert (again.loc[unchanged, "status"] == "already_stored").all()
    store = SpectraStore(path)
    assert len(store) == 6 and store.meta["obsid"].is_unique and store.revision == 1
    assert store.meta["source"].tolist() == [str(c) for c in copies]
    _assert_row_is(store, int(first.loc[str(copies[2]), "row"]), originals[7])
    _assert_row_is(store, int(first.loc[str(copies[4]), "row"]), originals[4])
    for k in (0, 1, 3, 5):
        _assert_row_is(store, k, originals[k])
    assert store.meta.loc[2, "source_mtime_ns"] == copies[2].stat().st_mtime_ns
    assert not list((path / "meta").glob("patch-*")) and len(store._parts) == 1  # compacted
    third = ingest(copies, path, n_workers=1, progress=False)
    assert (third["status"] == "already_stored").all() and SpectraStore(path).revision == 1
    copies[5].unlink()  # a file deleted after its ingest has not changed: its row stays
    fourth = ingest(copies, path, n_workers=1, progress=False).set_index("source")
    assert (fourth["status"] == "already_stored").all()
    assert "cannot be found" in fourth.loc[str(copies[5]), "reason"]
    _assert_row_is(SpectraStore(path), 5, originals[5])


def test_a_changed_source_that_now_fails_or_duplicates_retires_its_row(real_lamost, tmp_path):
    """A changed file that gives no spectrum now must not leave its old spectrum behind; its
    row is retired (no data, obsid -1), no obsid is stored twice, and once the file is good
    again its spectrum goes back into that row."""
    copies, originals = _copies(real_lamost, tmp_path / "src", 5)
    path = tmp_path / "s.zarr"
    ingest(copies, path, n_workers=1, chunk_size=2, commit_rows=4, progress=False)
    _rewrite(copies[1], b"SIMPLE  = T" + b" " * 100)          # truncated: unreadable now
    _rewrite(copies[3], copies[0].read_bytes())               # now the obsid of row 0
    report = ingest(copies, path, n_workers=1, chunk_size=2, progress=False).set_index("source")
    assert report.loc[str(copies[1]), "status"] == "failed"
    assert "row 1 was retired" in report.loc[str(copies[1]), "reason"]
    assert report.loc[str(copies[3]), "status"] == "duplicate"
    store = SpectraStore(path)
    meta = store.meta
    assert len(store) == 5 and meta.loc[[1, 3], "obsid"].tolist() == [-1, -1]
    assert meta.loc[[1, 3], "n_good"].tolist() == [0, 0]
    assert meta.loc[meta["obsid"] >= 0, "obsid"].is_unique
    flux, ivar = store.read([1, 3])
    assert (ivar == 0).all() and (flux == 1).all()
    revision = store.revision
    again = ingest(copies, path, n_workers=1, progress=False).set_index("source")
    assert again.loc[str(copies[1]), "status"] == "failed"
    assert SpectraStore(path).revision == revision           # retired once, not per run
    _rewrite(copies[1], originals[1].read_bytes())
    _rewrite(copies[3], originals[3].read_bytes())
    back = ingest(copies, path, n_workers=1, progress=False).set_index("source")
    assert back.loc[[str(copies[1]), str(copies[3])], "row"].tolist() == [1, 3]
    store = SpectraStore(path)
    assert len(store) == 5 and store.meta["obsid"].is_unique
    for k in range(5):
        _assert_row_is(store, k, originals[k])


def test_an_interrupted_replacement_is_finished_or_undone_and_nothing_is_lost(
        real_lamost, tmp_path, monkeypatch):
    """Killed after its intent was committed: the next writer finishes it from the staged rows.
    Killed before: the old rows stay, and the next ingest replaces them."""
    copies, originals = _copies(real_lamost, tmp_path / "src", 4)
    path = tmp_path / "s.zarr"
    ingest(copies, path, n_workers=1, chunk_size=2, commit_rows=4, progress=False)
    _rewrite(copies[1], originals[5].read_bytes())
    _rewrite(copies[2], originals[6].read_bytes())

    def killed(self, flux, ivar):  # the state of a process killed right after the intent
        raise OSError(5, "killed")

    monkeypatch.setattr(SpectraStore, "_apply_pending", killed)
    with pytest.raises(OSError, match="killed"):
        ingest(copies, path, n_workers=1, progress=False)
    monkeypatch.undo()
    assert json.loads((path / "COMMIT.json").read_text())["pending"]["rows"] == [1, 2]
    reader = SpectraStore(path)                   # readers: the committed (old) metadata
    assert len(reader) == 4 and reader.revision == 0
    with SpectraStore(path, "a") as store:        # the next writer finishes the replacement
        assert store.revision == 1 and store.flux.shape == (4, P)
    store = SpectraStore(path)
    _assert_row_is(store, 1, originals[5])
    _assert_row_is(store, 2, originals[6])
    _assert_row_is(store, 0, originals[0])
    assert ingest(copies, path, n_workers=1, progress=False)["status"].eq(
        "already_stored").all()

    _rewrite(copies[3], originals[4].read_bytes())  # killed before the intent: undone
    original_write = SpectraStore._write_commit

    def no_intent(self, *args, pending=None, **kwargs):
        if pending is not None:
            raise OSError(5, "killed")
        return original_write(self, *args, pending=pending, **kwargs)

    monkeypatch.setattr(SpectraStore, "_write_commit", no_intent)
    with pytest.raises(OSError, match="killed"):
        ingest(copies, path, n_workers=1, progress=False)
    monkeypatch.undo()
    with SpectraStore(path, "a") as store:
        assert store.flux.shape == (4, P) and not list((path / "meta").glob("patch-*"))
    _assert_row_is(SpectraStore(path), 3, originals[3])   # the old row, whole
    report = ingest(copies, path, n_workers=1, progress=False).set_index("source")
    assert report.loc[str(copies[3]), "reason"].startswith("replaced row 3")
    store = SpectraStore(path)
    assert len(store) == 4 and store.meta["obsid"].is_unique
    _assert_row_is(store, 3, originals[4])


def test_a_version_1_store_is_read_and_upgraded_its_files_read_once_more(real_lamost, tmp_path):
    """Stores written before the fingerprints: readable as they are; the first ingest reads
    their files again (their rows' fingerprints are unknown) and replaces the rows in place."""
    import pyarrow.parquet as pq
    import zarr

    copies, originals = _copies(real_lamost, tmp_path / "src", 3)
    path = tmp_path / "s.zarr"
    ingest(copies, path, n_workers=1, progress=False)
    zarr.open_group(path, mode="r+").attrs["format_version"] = 1  # as the old code wrote it
    for part in (path / "meta").glob("part-*.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.drop(["source_size", "source_mtime_ns"]), part)
    commit = json.loads((path / "COMMIT.json").read_text())
    (path / "COMMIT.json").write_text(json.dumps({"n_rows": commit["n_rows"],
                                                  "parts": commit["parts"]}))
    _rewrite(copies[1], originals[4].read_bytes())  # changed while the store was version 1
    old = SpectraStore(path)
    assert old.format_version == 1 and (old.meta["source_size"] == -1).all()
    report = ingest(copies, path, n_workers=1, progress=False)
    assert (report["status"] == "stored").all() and report["row"].tolist() == [0, 1, 2]
    store = SpectraStore(path)
    assert store.format_version == 2 and len(store) == 3 and (store.meta["source_size"] > 0).all()
    _assert_row_is(store, 1, originals[4])
    assert (ingest(copies, path, n_workers=1, progress=False)["status"] == "already_stored").all()


def test_kill_9_while_replacing_a_regenerated_folder_loses_and_duplicates_nothing(
        real_lamost, tmp_path):
    """A whole folder regenerated under the same names (each file now holds the next file's
    star, so every obsid moves to another row), its re-ingest killed with SIGKILL after some
    replacements were committed, then run again: every row holds its file's current spectrum,
    each obsid once, no row lost or added."""
    copies, _ = _copies(real_lamost, tmp_path / "src", 240)
    store_path = tmp_path / "s.zarr"
    ingest(tmp_path / "src", store_path, n_workers=1, chunk_size=8, commit_rows=32,
           chunk_rows=16, progress=False)
    data = [c.read_bytes() for c in copies]
    for k, c in enumerate(copies):
        _rewrite(c, data[(k + 1) % len(copies)])
    script = tmp_path / "run.py"
    script.write_text(KILLED_INGEST)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "src"),
                             str(store_path)], env=env)
    commit = store_path / "COMMIT.json"
    deadline = time.monotonic() + 120
    revision = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            revision = json.loads(commit.read_text()).get("revision", 0)
        except (OSError, ValueError):
            pass
        if revision >= 2:
            break
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the ingest ended before it could be killed"
    assert 2 <= SpectraStore(store_path).revision < 240 // 32 + 1
    report = ingest(tmp_path / "src", store_path, n_workers=2, progress=False)
    assert (report["status"] == "stored").sum() > 0
    assert report["status"].isin(["stored", "already_stored"]).all()
    store = SpectraStore(store_path)
    assert len(store) == 240 and store.meta["obsid"].is_unique
    sources = store.meta["source"].tolist()
    assert sorted(sources) == sorted(str(c) for c in copies)
    flux, ivar = store.read()
    for k in range(0, 240, 7):
        f, i = sp.preprocess(sp.read_lamost(sources[k]))
        np.testing.assert_array_equal(flux[k], f)
        np.testing.assert_array_equal(ivar[k], i)
    again = ingest(tmp_path / "src", store_path, n_workers=1, progress=False)
    assert (again["status"] == "already_stored").all()
