"""The archive download path, against a local stand-in server (no internet).

The stand-in (``tests/archive_server.py``) serves the real LAMOST DR10 files of
``../shared/data/lamost`` by obsid and answers XMatch and VizieR requests in their own formats.
GALAH, Gaia, distance, binary and cluster answers are synthetic tables placed at the positions of
the real LAMOST stars (none of those stars has GALAH labels).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import socket

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from lamostcannon import archives
from lamostcannon.archives import (ArchiveUnavailable, Downloader, Endpoints, FileTask, Manifest)
from lamostcannon.labels import ELEMENTS

from archive_server import (GALAH_CATALOG_ROUTE, SLINK_ROUTE, SPECTRUM_ROUTE, XMATCH_ROUTE,
                            ArchiveServer, galah_camera, path_of)

N_STARS = 64  # LAMOST stars with a GALAH partner (the refit model needs > 56 per pixel)


def _fast(**kw):
    """A downloader with short timeouts and pauses, for tests."""
    opts = dict(timeout=(1.0, 0.5), retries=2, backoff=0.01, workers=4, progress=False)
    opts.update(kw)
    return Downloader(**opts)


def _lamost_rows(real_lamost, n):
    with open(real_lamost / "dr10" / "catalog.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["filename"].endswith(".fits.gz")
                and (real_lamost / "dr10" / r["filename"]).is_file()]
    rows.sort(key=lambda r: int(r["obsid"]))
    return rows[:n]


@pytest.fixture(scope="module")
def world(real_lamost):
    """The stand-in server, loaded with real LAMOST files and synthetic companion tables."""
    rng = np.random.default_rng(5)
    rows = _lamost_rows(real_lamost, N_STARS)
    assert len(rows) == N_STARS
    srv = ArchiveServer(stall_seconds=1.5).start()
    obsid = np.array([int(r["obsid"]) for r in rows])
    ra = np.array([float(r["ra"]) for r in rows])
    dec = np.array([float(r["dec"]) for r in rows])
    for r in rows:
        srv.spectra[int(r["obsid"])] = (real_lamost / "dr10" / r["filename"]).read_bytes()
    parsed = [re.match(r"spec-(\d+)-(.+)_sp(\d+)-(\d+)\.fits\.gz", r["filename"]).groups()
              for r in rows]
    srv.xmatch_tables["V/153/dr4"] = Table({
        "ObsID": obsid, "Target": [f"J{o}" for o in obsid], "ObsDate": ["2021-10-01"] * N_STARS,
        "LMJD": [int(p[0]) for p in parsed], "MJD": [int(p[0]) - 1 for p in parsed],
        "PlanId": [p[1] for p in parsed], "spId": [int(p[2]) for p in parsed],
        "FiberId": [int(p[3]) for p in parsed], "RAdeg": ra, "DEdeg": dec,
        "snru": rng.uniform(5, 50, N_STARS), "snrg": [float(r["snrg"]) for r in rows],
        "snrr": rng.uniform(5, 50, N_STARS), "snri": rng.uniform(5, 50, N_STARS),
        "snrz": rng.uniform(5, 80, N_STARS), "Class": [r["class"] for r in rows],
        "SubClass": [r["subclass"] for r in rows], "z": [float(r["z"]) for r in rows],
        "e_z": np.full(N_STARS, 1e-5)})
    srv.xmatch_tables["V/153/stellar"] = Table({
        "ObsID": obsid, "RAdeg": ra, "DEdeg": dec, "Teff": [float(r["teff"]) for r in rows],
        "e_Teff": np.full(N_STARS, 100.0), "logg": [float(r["logg"]) for r in rows],
        "e_logg": np.full(N_STARS, 0.15), "[Fe/H]": [float(r["feh"]) for r in rows],
        "e_[Fe/H]": np.full(N_STARS, 0.1), "HRV": rng.normal(0, 30, N_STARS)})
    # GALAH: one star 0.3 arcsec from each LAMOST star, and 6 stars far from any.
    n_far = 6
    sid = 170000000000000 + np.arange(N_STARS + n_far) * 1001
    g_ra = np.concatenate([ra + 0.3 / 3600 / np.cos(np.radians(dec)), rng.uniform(0, 1, n_far)])
    g_dec = np.concatenate([dec, -80 + rng.uniform(0, 1, n_far)])
    galah = Table({"sobject_id": sid, "star_id": [f"2M{s}" for s in sid], "ra": g_ra,
                   "dec": g_dec, "teff": rng.uniform(4800, 6200, sid.size),
                   "e_teff": np.full(sid.size, 80.0), "logg": rng.uniform(2.5, 4.6, sid.size),
                   "e_logg": np.full(sid.size, 0.2), "fe_h": rng.normal(-0.1, 0.3, sid.size),
                   "e_fe_h": np.full(sid.size, 0.1), "flag_fe_h": np.zeros(sid.size, int),
                   "vmic": rng.uniform(0.8, 1.6, sid.size), "vsini": rng.uniform(2, 10, sid.size),
                   "alpha_fe": rng.normal(0.05, 0.1, sid.size)})
    for el in ELEMENTS:
        galah[f"{el}_fe"] = rng.normal(0.0, 0.15, sid.size)
        galah[f"e_{el}_fe"] = np.full(sid.size, 0.08)
        galah[f"flag_{el}_fe"] = np.zeros(sid.size, int)
    galah["flag_cannon"] = np.zeros(sid.size, int)
    galah["chi2_cannon"] = rng.uniform(0.5, 3, sid.size)
    for k in (1, 2, 3, 4):
        galah[f"snr_c{k}"] = rng.uniform(20, 90, sid.size)
    buf = io.BytesIO()
    galah.write(buf, format="fits")
    srv.files[path_of(GALAH_CATALOG_ROUTE)] = buf.getvalue()
    for i in range(N_STARS):
        for band, ccd in (("B", 1), ("G", 2), ("R", 3), ("I", 4)):
            srv.galah_spectra[(int(sid[i]), band)] = galah_camera(ccd, galah[i], rng)
    # Gaia DR2: a bright (0.2") and a faint (0.6") source near each star, one 3" away.
    n = N_STARS
    src = 4000000000000000000 + np.arange(3 * n)
    offs = np.concatenate([np.full(n, 0.2), np.full(n, 0.6), np.full(n, 3.0)]) / 3600
    gmag = np.concatenate([np.full(n, 12.0), np.full(n, 18.0), np.full(n, 8.0)])
    gra = np.tile(ra, 3)
    gdec = np.tile(dec, 3) + offs
    srv.xmatch_tables["I/345/gaia2"] = Table({
        "Source": src, "RA_ICRS": gra, "DE_ICRS": gdec, "Epoch": np.full(3 * n, 2015.5),
        "Plx": rng.uniform(0.5, 5, 3 * n), "e_Plx": np.full(3 * n, 0.05),
        "pmRA": rng.normal(0, 10, 3 * n), "e_pmRA": np.full(3 * n, 0.1),
        "pmDE": rng.normal(0, 10, 3 * n), "e_pmDE": np.full(3 * n, 0.1),
        "RV": rng.normal(0, 30, 3 * n), "e_RV": np.full(3 * n, 1.0), "Gmag": gmag})
    rest = rng.uniform(100, 2000, 3 * n)
    srv.xmatch_tables["I/347/gaia2dis"] = Table({
        "Source": src, "RA_ICRS": gra, "DE_ICRS": gdec, "rest": rest, "b_rest": rest * 0.9,
        "B_rest": rest * 1.1})
    srv.vizier_tables["J/A+A/618/A93/members"] = [Table({
        "Source": src[:5], "RA_ICRS": gra[:5], "DE_ICRS": gdec[:5],
        "Cluster": ["NGC_2632"] * 3 + ["Melotte_22"] * 2, "PMemb": [1.0, 0.9, 0.7, 1.0, 0.5]})]
    srv.vizier_tables["J/MNRAS/480/4884"] = [Table({
        "Source1": src[:3], "Source2": src[3:6], "RA1": gra[:3], "DE1": gdec[:3],
        "RA2": gra[3:6], "DE2": gdec[3:6], "sepAU": [500.0, 1200.0, 3000.0],
        "Gmag1": gmag[:3], "Gmag2": gmag[3:6]})]
    srv.rows, srv.galah = rows, galah
    yield srv
    srv.stop()


def _endpoints(srv, **kw):
    return Endpoints(vizier=srv.url, xmatch=srv.url + path_of(XMATCH_ROUTE),
                     lamost_spectra=srv.url + path_of(SPECTRUM_ROUTE, "{obsid}"),
                     galah_catalog=srv.url + path_of(GALAH_CATALOG_ROUTE),
                     galah_spectra=srv.url + path_of(SLINK_ROUTE) + "?ID={sobject_id}&DR=galah_dr2"
                                             "&IDX=0&FILT={band}&RESPONSEFORMAT=fits", **kw)



def test_download_all_writes_the_raw_layout_and_is_idempotent(world, tmp_path, real_lamost):
    srv = world
    out = tmp_path / "archive"
    report = archives.download_all(out, endpoints=_endpoints(srv), downloader=_fast())
    assert report.ok, str(report)
    for rel in ("galah/catalog.fits", "galah/window_spectra.fits", "lamost/catalog.fits",
                "gaia/gaia_source.fits", "gaia/distances.fits", "binaries/wide_binaries.fits",
                "clusters/members.fits", "manifest.json"):
        assert (out / rel).is_file(), rel
    lam = Table.read(out / "lamost/catalog.fits")
    assert len(lam) == N_STARS and lam.colnames[-1] == "filename"
    assert np.all(np.isfinite(lam["teff"])) and np.all(lam["lmjd"] > 50000)
    for r in srv.rows:  # every spectrum is the real file, byte for byte, under its layout name
        assert (out / "lamost/spectra" / r["filename"]).read_bytes() == \
            (real_lamost / "dr10" / r["filename"]).read_bytes()
    gaia = Table.read(out / "gaia/gaia_source.fits")
    assert len(gaia) == N_STARS and np.all(gaia["phot_g_mean_mag"] == 12.0)  # brightest wins
    dist = Table.read(out / "gaia/distances.fits")
    assert set(dist["source_id"]) == set(gaia["source_id"])
    members = Table.read(out / "clusters/members.fits")
    assert "NGC_2632" in set(members["cluster"])
    binaries = Table.read(out / "binaries/wide_binaries.fits")
    assert np.all(binaries["pairdistance"] > 0)
    galah = Table.read(out / "galah/catalog.fits")
    assert len(galah) == N_STARS + 6 and "flag_eu_fe" in galah.colnames
    with fits.open(out / "galah/window_spectra.fits") as h:
        flux, sigma, model = h["FLUX"].data, h["SIGMA"].data, h["MODEL"].data
        assert flux.shape == (N_STARS, h["WAVE"].data.size)
        assert len(h["OBJECTS"].data) == N_STARS
    chi2 = np.nanmean(((flux - model) / sigma) ** 2)
    assert np.isfinite(model).mean() > 0.9 and 0.3 < chi2 < 3.0
    manifest = json.loads((out / "manifest.json").read_text())
    recs = {r["path"]: r for r in manifest["files"]}
    r0 = srv.rows[0]
    rec = recs[f"lamost/spectra/{r0['filename']}"]
    assert rec["url"].endswith(path_of(SPECTRUM_ROUTE, r0["obsid"]))
    assert rec["size"] == (out / rec["path"]).stat().st_size and len(rec["sha256"]) == 64
    assert manifest["notes"]["window_model"] == "refit"
    assert not (out / ".partial").exists() or not any((out / ".partial").rglob("*.part"))

    before = srv.count()
    again = archives.download_all(out, endpoints=_endpoints(srv), downloader=_fast())
    assert again.ok and srv.count() == before  # second run: not one request
    assert sum(len(s.fetched) for s in again.steps.values()) == 0


def test_faults_each_file_verified_and_failures_reported(world, tmp_path, real_lamost):
    srv = world
    rows = srv.rows[:16]
    path = {int(r["obsid"]): path_of(SPECTRUM_ROUTE, r["obsid"]) for r in rows}
    ids = list(path)
    drop, busy, corrupt_once, corrupt, stall = ids[:5]
    missing = 999999999
    srv.faults.clear()
    srv.always.clear()
    srv.faults[path[drop]] = ["drop"]
    srv.faults[path[busy]] = ["503"]
    srv.faults[path[corrupt_once]] = ["corrupt"]
    srv.always[path[corrupt]] = "corrupt"
    srv.always[path[stall]] = "stall"
    tasks = [FileTask(srv.url + path[o], f"lamost/spectra/{r['filename']}", key=str(o))
             for o, r in zip(ids, rows)]
    tasks.append(FileTask(f"{srv.url}/lamost/spectrum/fits/{missing}",
                          "lamost/spectra/spec-0-missing_sp01-001.fits.gz", key=str(missing)))
    manifest = Manifest(tmp_path)
    try:
        report = _fast().fetch_many(tasks, tmp_path, manifest, what="LAMOST spectra",
                                    validate=archives.validate_lamost)
    finally:
        srv.always.clear()
    reasons = {f.key: f.reason for f in report.failures}
    assert set(reasons) == {str(corrupt), str(stall), str(missing)}
    assert "checksum" in reasons[str(corrupt)]
    assert "timed out" in reasons[str(stall)]
    assert reasons[str(missing)] == "HTTP 404"
    assert srv.requests[path_of(SPECTRUM_ROUTE, missing)] == 1  # a 404 is not retried
    assert any(p == path[drop] for p, _ in srv.ranges)  # the dropped file was resumed
    for o, r in zip(ids, rows):
        dest = tmp_path / "lamost/spectra" / r["filename"]
        if str(o) in reasons:
            assert not dest.exists()
        else:
            assert dest.read_bytes() == (real_lamost / "dr10" / r["filename"]).read_bytes()
            assert manifest.is_verified(f"lamost/spectra/{r['filename']}")
    assert json.loads((tmp_path / "manifest.json").read_text())["files"]

    # A second run asks only for what failed; a third asks for nothing.
    srv.requests.clear()
    second = _fast().fetch_many(tasks, tmp_path, Manifest(tmp_path), what="LAMOST spectra",
                                validate=archives.validate_lamost)
    assert sorted(second.fetched) == sorted([str(corrupt), str(stall)])
    assert [f.key for f in second.failures] == [str(missing)]
    assert set(p for p in srv.requests if p != "/") == {path[corrupt], path[stall],
                                                         path_of(SPECTRUM_ROUTE, missing)}
    srv.requests.clear()
    third = _fast().fetch_many(tasks[:-1], tmp_path, Manifest(tmp_path), what="LAMOST spectra")
    assert not third.fetched and len(third.skipped) == len(tasks) - 1 and srv.count() == 0


def test_interrupted_download_resumes_with_range(world, tmp_path, real_lamost):
    srv = world
    r = srv.rows[20]
    data = (real_lamost / "dr10" / r["filename"]).read_bytes()
    rel = f"lamost/spectra/{r['filename']}"
    part = tmp_path / ".partial" / (rel + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1000])  # what an interrupted run left
    srv.ranges.clear()
    url = f"{srv.url}/lamost/spectrum/fits/{r['obsid']}"
    rep = _fast().fetch_many([FileTask(url, rel, key="x")], tmp_path, Manifest(tmp_path),
                             what="LAMOST spectra", validate=archives.validate_lamost)
    assert rep.fetched == ["x"] and (tmp_path / rel).read_bytes() == data
    assert srv.ranges == [(path_of(SPECTRUM_ROUTE, r["obsid"]), "bytes=1000-")]
    assert not part.exists()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_offline_raises_archive_unavailable_and_writes_nothing(tmp_path):
    base = f"http://127.0.0.1:{_closed_port()}"
    ep = Endpoints(vizier=base, xmatch=base + "/xmatch", galah_catalog=base + "/cat.fits",
                   lamost_spectra=base + "/{obsid}", galah_spectra=base + "/{sobject_id}{band}")
    out = tmp_path / "archive"
    with pytest.raises(ArchiveUnavailable) as err:
        archives.download_all(out, endpoints=ep, downloader=_fast())
    text = str(err.value)
    assert "GALAH" in text and "LAMOSTCANNON_SOURCE=mock" in text and "refused" in text
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_archive_down_raises_archive_unavailable(world, tmp_path):
    srv = world
    srv.down = True
    try:
        with pytest.raises(ArchiveUnavailable, match="HTTP 503"):
            archives.download_all(tmp_path / "a", endpoints=_endpoints(srv), downloader=_fast())
    finally:
        srv.down = False
    assert not any(p.is_file() for p in (tmp_path / "a").rglob("*"))


def test_plain_fits_answer_is_stored_gzipped(tmp_path, real_lamost):
    src = next((real_lamost / "dr10").glob("*.fits.gz"))
    part = tmp_path / "x.part"
    part.write_bytes(gzip.decompress(src.read_bytes()))
    archives.validate_lamost(part, FileTask("u", "x"))
    assert gzip.decompress(part.read_bytes()) == gzip.decompress(src.read_bytes())
    part.write_bytes(b"<html>error</html>")
    with pytest.raises(ValueError):
        archives.validate_lamost(part, FileTask("u", "x"))


def test_conform_finds_aliases_and_fills_missing():
    t = Table({"Source": [1, 2], "rest": [10.0, 20.0], "b_rest": [9.0, 18.0]})
    out = archives.conform(t, archives.core.DISTANCE_SCHEMA, "distances")
    assert out.colnames == ["source_id", "r_est", "r_lo", "r_hi"]
    assert list(out["source_id"]) == [1, 2] and np.all(np.isnan(out["r_hi"]))
    assert out.meta["missing"] == "r_hi" and str(out["r_est"].unit) == "pc"


def test_lamost_filename_layout():
    assert archives.lamost_filename(55859, "F5902", 3, 32) == "spec-55859-F5902_sp03-032.fits.gz"


def test_endpoints_from_environment(monkeypatch):
    monkeypatch.setenv("LAMOSTCANNON_LAMOST_URL", "http://example.invalid/{obsid}")
    assert Endpoints().lamost_spectra == "http://example.invalid/{obsid}"
    assert Endpoints(lamost_release="dr10").lamost_xmatch is None
    with pytest.raises(ValueError, match="galah_release"):
        Endpoints(galah_release="dr9")


# ------------------------------------------------------------------------------ hostile answers

def _fits_catalogue(n_rows=4000) -> bytes:
    """A multi-HDU FITS catalogue (primary image + two tables), as an archive would serve."""
    rng = np.random.default_rng(2)
    hdus = [fits.PrimaryHDU(np.zeros((10, 10), np.float32)),
            fits.BinTableHDU(Table({"sobject_id": np.arange(n_rows), "teff": rng.normal(
                5500, 300, n_rows)}), name="CATALOG"),
            fits.BinTableHDU(Table({"x": rng.normal(size=n_rows // 2)}), name="EXTRA")]
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


def test_a_catalogue_cut_short_with_a_consistent_length_is_refused_at_download(world, tmp_path):
    srv = world
    data = _fits_catalogue()
    full, cut = "/files/whole.fits", "/files/cut.fits"
    srv.files[full] = data
    srv.files[cut] = data[:len(data) // 2]  # Content-Length says half: nothing to notice
    try:
        report = _fast().fetch_many(
            [FileTask(srv.url + full, "cat/whole.fits", key="whole"),
             FileTask(srv.url + cut, "cat/cut.fits", key="cut")],
            tmp_path, Manifest(tmp_path), what="catalogue", validate=archives.validate_fits)
    finally:
        del srv.files[full], srv.files[cut]
    assert report.fetched == ["whole"] and [f.key for f in report.failures] == ["cut"]
    assert "truncated: HDU 1 declares" in report.failures[0].reason
    assert not (tmp_path / "cat/cut.fits").exists()
    # the walker itself, on every cut of the file and on the gzipped file
    from lamostcannon.archives import fits_size_problem

    assert fits_size_problem(io.BytesIO(data), len(data)) is None
    assert fits_size_problem(io.BytesIO(gzip.decompress(gzip.compress(data)))) is None
    for cut_at in (100, 2880, 2880 * 2 + 10, len(data) // 2, len(data) - 2880 - 1):
        assert "truncated" in fits_size_problem(io.BytesIO(data[:cut_at]), cut_at), cut_at
        assert "truncated" in fits_size_problem(io.BytesIO(data[:cut_at])), cut_at


def test_a_gzip_bomb_served_as_a_spectrum_is_refused_at_download(world, tmp_path):
    import reliability_harness as rh

    srv = world
    bomb = rh.write_gzip_bomb(tmp_path / "bomb.fits.gz", 256 * 2 ** 20).read_bytes()
    srv.spectra[7] = bomb
    try:
        report = _fast().fetch_many(
            [FileTask(f"{srv.url}{path_of(SPECTRUM_ROUTE, 7)}", "lamost/spectra/bomb.fits.gz",
                      key="bomb")], tmp_path, Manifest(tmp_path), what="LAMOST spectra",
            validate=archives.validate_lamost)
    finally:
        del srv.spectra[7]
    assert [f.key for f in report.failures] == ["bomb"]
    assert "exceeds the 67108864-byte limit" in report.failures[0].reason
    assert not (tmp_path / "lamost/spectra/bomb.fits.gz").exists()


def test_a_gzipped_truncated_fits_with_a_valid_crc_is_refused(world, tmp_path, real_lamost):
    src = sorted((real_lamost / "dr10").glob("*.fits.gz"))[0]
    part = tmp_path / "x.part"
    part.write_bytes(gzip.compress(gzip.decompress(src.read_bytes())[:10000]))
    with pytest.raises(ValueError, match="inside the gzip: truncated"):
        archives.validate_lamost(part, FileTask("u", "x"))


def test_a_dripping_server_is_abandoned_within_the_deadline(world, tmp_path):
    import time

    srv = world
    r = srv.rows[30]
    path = path_of(SPECTRUM_ROUTE, r["obsid"])
    srv.always[path] = "drip"
    deadline = 2.0
    t0 = time.monotonic()
    try:
        report = _fast(deadline=deadline, timeout=(1.0, 1.0)).fetch_many(
            [FileTask(srv.url + path, f"lamost/spectra/{r['filename']}", key="drip")],
            tmp_path, Manifest(tmp_path), what="LAMOST spectra",
            validate=archives.validate_lamost)
    finally:
        srv.always.clear()
    elapsed = time.monotonic() - t0
    assert [f.key for f in report.failures] == ["drip"]
    reason = report.failures[0].reason
    assert "deadline" in reason and "bytes received" in reason, reason
    assert elapsed < deadline + 1.5, elapsed  # a byte every 0.3 s never trips the 1 s read timeout
    assert not (tmp_path / "lamost/spectra" / r["filename"]).exists()
    assert list((tmp_path / ".partial").rglob("*.part"))  # kept, to resume


# ------------------------------------------------------------------------------ notebook 09's sample

def test_real_sources_fetches_the_shipped_sample_when_the_folder_is_absent(world, tmp_path,
                                                                          monkeypatch,
                                                                          real_lamost):
    """Without ../shared, ``real.real_sources()`` fetches notebook 09's spectra by obsid (here
    from the local server, which holds 64 of the 1726 DR10 files and 5 DR8 repeat visits)."""
    import pandas as pd

    from lamostcannon import real

    srv = world
    groups = pd.read_csv(real_lamost / "dr8_repeats" / "groups.csv")
    dr8 = [(int(o), f.rsplit("/", 1)[-1]) for o, f in
           zip(groups["combined_obsid"], groups["combined_file"])
           if (real_lamost / "dr8_repeats" / f.rsplit("/", 1)[-1]).is_file()][:5]
    for obsid, name in dr8:
        srv.spectra[obsid] = (real_lamost / "dr8_repeats" / name).read_bytes()
    template = srv.url + path_of(SPECTRUM_ROUTE, "{obsid}")
    monkeypatch.setenv("LAMOSTCANNON_LAMOST_DIR", str(tmp_path / "no_shared"))
    monkeypatch.setenv("LAMOSTCANNON_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("LAMOSTCANNON_LAMOST_URL", template)
    monkeypatch.setenv("LAMOSTCANNON_LAMOST_DR8_URL", template)
    for var in (real.ENV_SPECTRA, real.ENV_LABELS, real.ENV_REPEATS, real.ENV_FETCH):
        monkeypatch.delenv(var, raising=False)
    try:
        src = real.real_sources(require_repeats=True)
    finally:
        for obsid, _ in dr8:
            del srv.spectra[obsid]
    out = tmp_path / "data" / "raw" / "real_lamost"
    assert src.spectra_dir == out / "dr10" and src.repeats_dir == out / "dr8_repeats"
    assert real.run_name(src) == "real_dr10"  # the products keep their names
    table = real.read_label_table(src.labels_path)
    assert len(table) == 1726
    for r in srv.rows:  # the served files arrived, byte for byte, under their names
        assert (src.spectra_dir / r["filename"]).read_bytes() == \
            (real_lamost / "dr10" / r["filename"]).read_bytes()
    assert len(list(src.spectra_dir.glob("*.fits.gz"))) == len(srv.rows)
    assert {p.name for p in src.repeats_dir.glob("*.fits.gz")} == {n for _, n in dr8}
    rep = real.read_repeat_groups(src.groups_path, src.repeats_dir)
    assert rep["exists"].sum() == 5
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["files"]) == len(srv.rows) + 5

    # offline: the old one-line RealDataMissing, now saying the archive is not reachable
    monkeypatch.setenv("LAMOSTCANNON_LAMOST_URL", f"http://127.0.0.1:{_closed_port()}/{{obsid}}")
    monkeypatch.setenv("LAMOSTCANNON_DATA", str(tmp_path / "data2"))
    with pytest.raises(real.RealDataMissing) as err:
        real.real_sources()
    text = str(err.value)
    assert "\n" not in text and "not reachable" in text and real.ENV_SPECTRA in text
    monkeypatch.setenv(real.ENV_FETCH, "0")
    with pytest.raises(real.RealDataMissing, match="forbids fetching"):
        real.real_sources()
