"""The archive path past step 01 (issue 14, item 8): what ``archives.download_all`` writes is
what notebooks 02-08 run on, with ``LAMOSTCANNON_SOURCE=archive``.

The local archive server (``tests/archive_server.py``) serves **real LAMOST DR10 spectra**
(``../shared/data/lamost/dr10``) by obsid, and answers for those stars as the services do:

* LAMOST catalogue (VizieR ``V/153/dr4`` + ``V/153/stellar`` through CDS XMatch): the archive's
  column names (``ObsID``, ``snrZ`` ...), positions, S/N, class and redshift from the real
  files' headers, the LAMOST pipeline (LASP) labels of ``catalog.csv``, LASP's ``-9999``
  sentinel where LASP gave no parameters and masked (null) VOTable cells;
* GALAH DR2.1 catalogue (a FITS file): **a stand-in** -- these stars have no GALAH labels, so
  teff, logg, [Fe/H] are the LASP labels plus seeded Gaussian noise (60 K, 0.1 dex, 0.05 dex),
  abundances seeded draws with an alpha-like trend with [Fe/H]; GALAH's conventions kept: NaN
  for an abundance not measured, ``flag_<x>_fe``, ``flag_cannon``, ``snr_c<k>_iraf``; and
  the four HERMES camera files of every star through a Data Central-style SODA service;
* Gaia DR2 (``I/345/gaia2``, masked ``RV`` for most stars as in DR2), Bailer-Jones distances
  (``I/347/gaia2dis``), Cantat-Gaudin members (``J/A+A/618/A93``: a Praesepe stand-in of
  our dwarfs) and El-Badry & Rix wide binaries (``J/MNRAS/480/4884``: pairs of our dwarfs).

Then cleaning, training (small models: four labels each), the catalogue and the science helpers
run on it; every step works or names the missing input in one line. Stars: the DR10 files with
``snrg > 30`` and LASP teff < 7000 K, lowest obsids first (240 dwarfs, 110 giants).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from astropy.table import MaskedColumn, Table

from archive_server import (GALAH_CATALOG_ROUTE, SLINK_ROUTE, SPECTRUM_ROUTE, XMATCH_ROUTE,
                            ArchiveServer, galah_camera, path_of)

N_DWARFS, N_GIANTS = 240, 110
SMALL_LABELS = {False: ("teff", "logg", "fe_h", "alpha_fe"), True: ("teff", "logg", "fe_h",
                                                                    "mg_fe")}


def _choose_stars(dr10):
    from lamostcannon import labels

    cat = pd.read_csv(dr10 / "catalog.csv").sort_values("obsid")
    cat = cat[(cat["snrg"] > 30) & (cat["teff"] < 7000) & cat["filename"].str.endswith(".gz")]
    giant = labels.is_giant(cat["teff"].to_numpy(), cat["logg"].to_numpy())
    return pd.concat([cat[~giant].head(N_DWARFS), cat[giant].head(N_GIANTS)]).reset_index(
        drop=True)


def _masked(values, mask):
    return MaskedColumn(np.asarray(values), mask=np.asarray(mask, bool))


@pytest.fixture(scope="module")
def archive(real_lamost):
    """The server, loaded; returns (server, the chosen stars with their fabricated labels)."""
    from lamostcannon import spectra
    from lamostcannon.labels import ELEMENTS

    rng = np.random.default_rng(14)
    dr10 = real_lamost / "dr10"
    stars = _choose_stars(dr10)
    n = len(stars)
    meta = pd.DataFrame([spectra.read_lamost(dr10 / f).meta for f in stars["filename"]])
    srv = ArchiveServer().start()
    for obsid, f in zip(stars["obsid"], stars["filename"]):
        srv.spectra[int(obsid)] = (dr10 / f).read_bytes()
    parts = [re.match(r"spec-(\d+)-(.+)_sp(\d+)-(\d+)\.fits\.gz", f).groups()
             for f in stars["filename"]]
    ra, dec = meta["ra"].to_numpy(), meta["dec"].to_numpy()
    no_snr = rng.uniform(size=n) < 0.05
    srv.xmatch_tables["V/153/dr4"] = Table({
        "ObsID": stars["obsid"].to_numpy(), "Target": meta["designation"],
        "ObsDate": ["2019-01-01"] * n, "LMJD": [int(p[0]) for p in parts],
        "MJD": meta["mjd"].to_numpy(), "PlanId": [p[1] for p in parts],
        "spId": [int(p[2]) for p in parts], "FiberId": [int(p[3]) for p in parts],
        "RAdeg": ra, "DEdeg": dec, "snrU": _masked(meta["snru"], no_snr),
        "snrG": meta["snrg"].to_numpy(), "snrR": meta["snrr"].to_numpy(),
        "snrI": meta["snri"].to_numpy(), "snrZ": meta["snrz"].to_numpy(),
        "Class": meta["class"], "SubClass": meta["subclass"], "z": meta["z"].to_numpy(),
        "e_z": _masked(meta["z_err"], no_snr)})
    sentinel = np.zeros(n, bool)
    sentinel[[3, 50, n - 2]] = True  # LASP gave no parameters: -9999, as the catalogue says
    lasp = {k: np.where(sentinel, -9999.0, stars[k].to_numpy(float))
            for k in ("teff", "logg", "feh")}
    srv.xmatch_tables["V/153/stellar"] = Table({
        "ObsID": stars["obsid"].to_numpy(), "RAdeg": ra, "DEdeg": dec, "Teff": lasp["teff"],
        "e_Teff": np.where(sentinel, -9999.0, 80.0), "logg": lasp["logg"],
        "e_logg": np.full(n, 0.15), "[Fe/H]": lasp["feh"], "e_[Fe/H]": np.full(n, 0.1),
        "HRV": _masked(rng.normal(0, 40, n), rng.uniform(size=n) < 0.1)})
    # GALAH stand-in (module docstring): 0.3 arcsec from each LAMOST star
    sid = 150000000000000 + 1001 * np.arange(n)
    teff = stars["teff"].to_numpy() + rng.normal(0, 60, n)
    logg = stars["logg"].to_numpy() + rng.normal(0, 0.1, n)
    fe_h = stars["feh"].to_numpy() + rng.normal(0, 0.05, n)
    galah = Table({"sobject_id": sid, "star_id": [f"{s}" for s in sid],
                   "ra": ra + 0.3 / 3600 / np.cos(np.radians(dec)), "dec": dec,
                   "teff": teff, "e_teff": np.full(n, 70.0), "logg": logg,
                   "e_logg": np.full(n, 0.15), "fe_h": fe_h, "e_fe_h": np.full(n, 0.07),
                   "flag_fe_h": np.zeros(n, int), "vmic": 0.9 + 0.4 * (logg < 3.5)
                   + rng.normal(0, 0.1, n), "vsini": rng.uniform(3, 12, n),
                   "alpha_fe": -0.25 * np.clip(fe_h, -1, 0.3) + rng.normal(0.03, 0.04, n)})
    for el in ELEMENTS:
        alpha = el in ("o", "mg", "si", "ca", "ti")
        value = (-0.25 * np.clip(fe_h, -1, 0.3) if alpha else 0.0) + rng.normal(0.0, 0.08, n)
        flag = np.where(rng.uniform(size=n) < 0.05, 32, 0)  # GALAH: flagged, value NaN
        galah[f"{el}_fe"] = np.where(flag == 0, value, np.nan)
        galah[f"e_{el}_fe"] = np.where(flag == 0, 0.07, np.nan)
        galah[f"flag_{el}_fe"] = flag
    galah["flag_cannon"] = np.where(rng.uniform(size=n) < 0.04, 1, 0)
    galah["chi2_cannon"] = rng.uniform(0.5, 3.0, n)
    for k in (1, 2, 3, 4):
        galah[f"snr_c{k}_iraf"] = rng.uniform(35, 120, n)
    import io

    buf = io.BytesIO()
    galah.write(buf, format="fits")
    srv.files[path_of(GALAH_CATALOG_ROUTE)] = buf.getvalue()
    for i in range(n):
        for band, ccd in (("B", 1), ("G", 2), ("R", 3), ("I", 4)):
            srv.galah_spectra[(int(sid[i]), band)] = galah_camera(ccd, galah[i], rng,
                                                                  step_factor=2.0)
    # Gaia DR2: one source 0.2 arcsec away; RVs only for a fifth (as in DR2)
    src = 3000000000000000000 + 7 * np.arange(n)
    plx = rng.uniform(0.4, 4.0, n)
    srv.xmatch_tables["I/345/gaia2"] = Table({
        "Source": src, "RA_ICRS": ra, "DE_ICRS": dec + 0.2 / 3600, "Epoch": np.full(n, 2015.5),
        "Plx": plx, "e_Plx": np.full(n, 0.04), "pmRA": rng.normal(0, 8, n),
        "e_pmRA": np.full(n, 0.06), "pmDE": rng.normal(0, 8, n), "e_pmDE": np.full(n, 0.06),
        "RV": _masked(rng.normal(0, 40, n), rng.uniform(size=n) > 0.2),
        "e_RV": _masked(np.full(n, 1.5), rng.uniform(size=n) > 0.2),
        "Gmag": rng.uniform(10, 15, n)})
    srv.xmatch_tables["I/347/gaia2dis"] = Table({
        "Source": src, "RA_ICRS": ra, "DE_ICRS": dec + 0.2 / 3600, "rest": 1000.0 / plx,
        "b_rest": 900.0 / plx, "B_rest": 1100.0 / plx})
    dwarfs = np.flatnonzero(np.arange(n) < N_DWARFS)
    members = dwarfs[:30]
    srv.vizier_tables["J/A+A/618/A93/members"] = [Table({
        "Source": src[members], "RA_ICRS": ra[members], "DE_ICRS": dec[members],
        "Cluster": ["NGC_2632"] * len(members),
        "PMemb": rng.uniform(0.7, 1.0, len(members))})]
    a, b = dwarfs[40:80:2], dwarfs[41:81:2]
    srv.vizier_tables["J/MNRAS/480/4884"] = [Table({
        "Source1": src[a], "Source2": src[b], "RA1": ra[a], "DE1": dec[a], "RA2": ra[b],
        "DE2": dec[b], "sepAU": rng.uniform(100, 5000, len(a)), "Gmag1": np.full(len(a), 12.0),
        "Gmag2": np.full(len(a), 12.5)})]
    yield srv, stars
    srv.stop()


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text.strip() and "\n" not in text.strip(), f"not a one-line message: {text!r}"
    return text


def test_archive_download_feeds_cleaning_training_catalogue_and_science(archive, tmp_path,
                                                                         monkeypatch):
    from lamostcannon import archives, binaries, catalog, cleaning, maps, paths
    from lamostcannon.cannon import CannonModel
    from lamostcannon.config import settings

    srv, stars = archive
    monkeypatch.setenv("LAMOSTCANNON_SOURCE", "archive")
    monkeypatch.setenv("LAMOSTCANNON_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("LAMOSTCANNON_WORKERS", "1")
    assert settings().source == "archive" and paths.raw_dir() == tmp_path / "data/raw/archive"
    ep = archives.Endpoints(
        vizier=srv.url, xmatch=srv.url + path_of(XMATCH_ROUTE),
        lamost_spectra=srv.url + path_of(SPECTRUM_ROUTE, "{obsid}"),
        galah_catalog=srv.url + path_of(GALAH_CATALOG_ROUTE),
        galah_spectra=srv.url + path_of(SLINK_ROUTE) + "?ID={sobject_id}&DR=galah_dr2&IDX=0"
                                                      "&FILT={band}&RESPONSEFORMAT=fits")
    dl = archives.Downloader(timeout=(2.0, 5.0), retries=1, backoff=0.01, workers=6,
                             progress=False)

    # 01: download
    report = archives.download_all(endpoints=ep, downloader=dl)
    assert report.ok, str(report)
    raw = paths.raw_dir()

    # 02: cleaning, and the reference spectra into a store
    reference, cuts = cleaning.build_reference_set(raw)
    n = dict(zip(cuts["step"], cuts["remaining"]))
    assert n["crossmatch"] >= len(stars) - 2  # two visits of one star share a GALAH partner
    assert n["lamost_params"] == n["flag_cannon"] - 3  # the three -9999 LASP rows
    assert n["dwarfs"] >= 30 and n["giants"] >= 25, cuts  # a 4-label model has 15 terms
    cleaning.write_reference_set(reference)
    ingested = cleaning.ingest_reference_spectra(reference, raw, progress=False, n_workers=1)
    assert (ingested["status"] == "stored").all(), ingested

    # 03: small models (four labels each), written where notebook 05 looks
    for group, giant in (("dwarf", False), ("giant", True)):
        table, flux, ivar, wave = cleaning.load_training_set(giant, reference)
        model = CannonModel(list(SMALL_LABELS[giant]), wavelength=wave).train(table, flux, ivar)
        model.write(paths.ensure(paths.processed_dir()) / f"model_{group}.fits")
        res = model.test(flux, ivar)
        fit = np.asarray(table["teff"]) - res.labels[:, 0]
        assert np.nanstd(fit) < 300, (group, np.nanstd(fit))  # it learned teff from the spectra

    # 05: every downloaded spectrum labelled, one row each, then the per-star catalogue
    lam = Table.read(raw / "lamost" / "catalog.fits")
    store = paths.interim_dir() / "survey_spectra.zarr"
    from lamostcannon import spectra

    files = [raw / "lamost" / "spectra" / f for f in np.asarray(lam["filename"], str)]
    rep = spectra.ingest(files, store, n_workers=1, progress=False)
    assert (rep["status"] == "stored").all()
    run = catalog.run_inference(store, catalog.load_context(), n_workers=1, progress=False)
    obs = catalog.assemble_observations(run.parts_dir, run.n_chunks).to_pandas()
    check = catalog.completeness(obs, store)
    assert check["n_rows"] == check["n_store"] == len(stars) and check["n_missing"] == 0
    no_lasp = (obs["flag"] & catalog.FLAG_NO_LASP) != 0
    assert no_lasp.sum() == 3  # the -9999 rows are flagged, not mistaken for labels
    table = catalog.build_catalog(obs)
    cat = table.to_pandas()
    assert (cat["source_id"] != catalog.NO_SOURCE_ID).mean() > 0.95  # Gaia matched
    assert np.isfinite(cat["R"]).mean() > 0.95 and np.isfinite(cat["Jz"]).mean() > 0.1

    # 06-08: the science helpers accept the catalogue; what a small model cannot give is named
    wide = Table.read(raw / "binaries" / "wide_binaries.fits").to_pandas()
    pairs = binaries.binary_pairs(cat, wide, max_delta_teff=None)
    assert len(pairs) >= 10
    members = Table.read(raw / "clusters" / "members.fits").to_pandas()
    praesepe = binaries.cluster_members(cat, members, binaries.PRAESEPE, min_proba=0.7)
    assert len(praesepe) >= 10 and np.isfinite(praesepe["alpha_fe"]).mean() > 0.5
    good = maps.quality_mask(cat)
    assert good.mean() > 0.3
    mapped = maps.add_cartesian(cat)
    giants = mapped[mapped["giantmodel"].to_numpy(bool)]
    outcome = {
        "gradients": _works_or_says_why(lambda: maps.gradient_table(giants, ["fe_h", "mg_fe"])),
        "rz_maps": _works_or_says_why(lambda: maps.rz_maps(giants, ["fe_h"])),
        # ba_fe is not a label of the small giant model: a NaN column, or named as missing
        "halo": _works_or_says_why(lambda: maps.halo_sample(giants, "ba_fe", seed=1)),
        "halo_without_column": _works_or_says_why(
            lambda: maps.halo_sample(giants.drop(columns=["ba_fe"]), "ba_fe", seed=1)),
    }
    assert "ba_fe" in str(outcome["halo_without_column"])


def _works_or_says_why(step):
    """Run ``step``: its result, or the one-line message of the ValueError/KeyError it raised."""
    try:
        return step()
    except (ValueError, KeyError) as exc:
        return _one_line(exc)
