"""The mock universe: a small Milky Way observed by LAMOST-, GALAH- and Gaia-like surveys.

Nobody can reach the archives from the machines this project runs on, so the default data source
is a simulated one written in the archives' own formats under ``paths.raw_dir("mock")``:

>>> from lamostcannon import mock
>>> out = mock.generate()                 # doctest: +SKIP  (size and seed from config.settings())
>>> mock.manifest_summary(out)            # doctest: +SKIP

:func:`generate` is idempotent (a complete mock with the same size, seed, package version and
mock code is left alone), resumable (spectra are written chunk by chunk and finished chunks are
not redone after an interruption) and deterministic (the same seed gives the same bytes, whatever
the number of worker processes).

Modules: :mod:`.galaxy` (populations, isochrones, positions, velocities), :mod:`.chemistry`
(abundance recipe), :mod:`.surveys` (selections, observations, catalogues), :mod:`.synth`
(spectra), :mod:`.writers` (file formats). The recipe is documented in ``docs/mock_universe.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .. import __version__, paths
from ..labels import ELEMENTS

log = logging.getLogger(__name__)

__all__ = ["generate", "read_manifest", "manifest_summary", "SUBDIRS"]

#: Folders written under the output directory.
SUBDIRS = ("lamost", "galah", "gaia", "binaries", "clusters", "truth")
_PROGRESS = "_progress"
_MANIFEST = "manifest.json"
_GALAH_CHUNK = 500


def _code_hash() -> str:
    """Hash of the mock's source files: a changed recipe invalidates an existing mock."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def read_manifest(out_dir=None) -> dict | None:
    """The manifest of a mock (``None`` if there is none)."""
    out = Path(out_dir) if out_dir is not None else paths.raw_dir("mock")
    try:
        return json.loads((out / _MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _is_complete(out: Path, params: dict) -> bool:
    man = read_manifest(out)
    if not man or not man.get("complete") or man.get("params") != params:
        return False
    for rec in man["files"]:
        try:
            if (out / rec["path"]).stat().st_size != rec["size"]:
                return False
        except FileNotFoundError:
            return False
    return True


def _clear(out: Path) -> None:
    """Remove a previous mock (only the folders the mock writes)."""
    for name in (*SUBDIRS, _PROGRESS):
        if (out / name).exists():
            shutil.rmtree(out / name)
    (out / _MANIFEST).unlink(missing_ok=True)


def _looks_like_mock(out: Path) -> bool:
    if not out.exists() or not any(out.iterdir()):
        return True
    man = read_manifest(out)
    return (man is not None and man.get("source") == "mock") or (out / _PROGRESS).exists()


# --------------------------------------------------------------------------------------------
# Spectra tasks (run in worker processes)
# --------------------------------------------------------------------------------------------

def _lamost_task(task):
    """Synthesise one chunk of LAMOST observations and write their files."""
    from . import synth, writers
    from .surveys import C_KMS

    index, df, seed_entropy, spawn_key, spec_dir, root = task
    rng = np.random.default_rng(np.random.SeedSequence(seed_entropy, spawn_key=spawn_key))
    out = synth.synthesize_lamost(df, rng, chunk_size=len(df))
    enc = writers.LamostFileEncoder(synth.lamost_wavelength())
    z_err = np.hypot(3.0, 150.0 / df["snrg"].to_numpy()) / C_KMS
    records = []
    spec_dir = Path(spec_dir)
    for i, row in enumerate(df.itertuples(index=False)):
        values = {
            "FILENAME": row.filename[:-3], "OBSID": int(row.obsid),
            "DATE-OBS": f"{row.obsdate}T{16 + (row.spid % 6):02d}:{(7 * row.fiberid) % 60:02d}:00",
            "LMJD": int(row.lmjd), "MJD": int(row.mjd), "PLANID": row.planid,
            "RA": float(row.ra), "DEC": float(row.dec), "RA_OBS": float(row.ra),
            "DEC_OBS": float(row.dec), "DESIG": row.designation, "FIBERID": int(row.fiberid),
            "OBJNAME": str(row.source_id), "MAG1": float(row.mag_g), "SPID": int(row.spid),
            "CLASS": row.klass,
            "SUBCLASS": row.subclass, "Z": float(out["z"][i]), "Z_ERR": float(z_err[i]),
            "SNRU": float(out["snru"][i]), "SNRG": float(out["snrg"][i]),
            "SNRR": float(out["snrr"][i]), "SNRI": float(out["snri"][i]),
            "SNRZ": float(out["snrz"][i]),
        }
        raw = enc.encode(values, out["flux"][i], out["ivar"][i], out["andmask"][i],
                         out["ormask"][i])
        records.append(writers.write_bytes(spec_dir / row.filename, writers.gzip_bytes(raw),
                                           Path(root)))
    result = {"index": index, "obsid": df["obsid"].astype(int).tolist(), "records": records,
              "z": out["z"].tolist(), "z_err": z_err.tolist()}
    for band in "ugriz":
        result[f"snr{band}"] = np.asarray(out[f"snr{band}"], float).round(4).tolist()
    return result


def _galah_task(task):
    """GALAH window spectra (flux from the truth, model from the reported labels) for a chunk."""
    from . import synth

    index, true_df, rep_df, snr, seed_entropy, spawn_key = task
    rng = np.random.default_rng(np.random.SeedSequence(seed_entropy, spawn_key=spawn_key))
    out = synth.synthesize_galah_windows(true_df, rep_df, snr, rng)
    return {"index": index, **{k: np.asarray(out[k]) for k in ("wave", "flux", "sigma", "model")}}


def _run_tasks(func, tasks, n_workers, progress, desc, on_result):
    """Run ``func`` over ``tasks`` (in processes when ``n_workers > 1``), calling ``on_result``."""
    if not tasks:
        return
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc=desc, unit="chunk")
    try:
        if n_workers <= 1 or len(tasks) == 1:
            for t in tasks:
                on_result(func(t))
                if bar is not None:
                    bar.update(1)
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
            with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as ex:
                futures = [ex.submit(func, t) for t in tasks]
                for fut in as_completed(futures):
                    on_result(fut.result())
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

def _lamost_catalog(lam):
    from astropy.table import Table

    cols = [("obsid", "i8", "", "unique spectrum id"), ("designation", "U", "", "LAMOST designation"),
            ("obsdate", "U", "", "observation date"), ("lmjd", "i4", "d", "local MJD"),
            ("mjd", "i4", "d", "MJD"), ("planid", "U", "", "plan id"),
            ("spid", "i2", "", "spectrograph id"), ("fiberid", "i2", "", "fibre id"),
            ("ra", "f8", "deg", "right ascension"), ("dec", "f8", "deg", "declination"),
            *[(f"snr{b}", "f4", "", f"S/N in the {b} band") for b in "ugriz"],
            ("class", "U", "", "spectral class"), ("subclass", "U", "", "spectral subclass"),
            ("z", "f8", "", "redshift"), ("z_err", "f8", "", "redshift uncertainty"),
            ("rv", "f4", "km / s", "radial velocity (c z)"),
            ("teff", "f4", "K", "LASP effective temperature"),
            ("teff_err", "f4", "K", "LASP teff uncertainty"),
            ("logg", "f4", "dex", "LASP surface gravity"), ("logg_err", "f4", "dex", ""),
            ("feh", "f4", "dex", "LASP [Fe/H]"), ("feh_err", "f4", "dex", ""),
            ("filename", "U", "", "spectrum file name")]
    t = Table()
    for name, dtype, unit, desc in cols:
        v = lam[name].to_numpy()
        t[name] = v.astype(str) if dtype == "U" else v.astype(dtype)
        if unit:
            t[name].unit = unit
        t[name].description = desc
    return t


def _galah_catalog(gal):
    from astropy.table import Table

    t = Table()
    t["sobject_id"] = gal["sobject_id"].to_numpy().astype(np.int64)
    t["star_id"] = gal["star_id"].to_numpy().astype(str)
    for c, unit in (("ra", "deg"), ("dec", "deg"), ("teff", "K"), ("e_teff", "K"), ("logg", "dex"),
                    ("e_logg", "dex"), ("fe_h", "dex"), ("e_fe_h", "dex")):
        t[c] = gal[c].to_numpy().astype("f8" if c in ("ra", "dec") else "f4")
        t[c].unit = unit
    t["flag_fe_h"] = gal["flag_fe_h"].to_numpy().astype(np.int32)
    t["vmic"] = gal["vmic"].to_numpy().astype("f4")
    t["vmic"].unit = "km / s"
    t["vsini"] = gal["vsini"].to_numpy().astype("f4")
    t["vsini"].unit = "km / s"
    t["alpha_fe"] = gal["alpha_fe"].to_numpy().astype("f4")
    for x in ELEMENTS:
        t[f"{x}_fe"] = gal[f"{x}_fe"].to_numpy().astype("f4")
        t[f"e_{x}_fe"] = gal[f"e_{x}_fe"].to_numpy().astype("f4")
        t[f"flag_{x}_fe"] = gal[f"flag_{x}_fe"].to_numpy().astype(np.int32)
    t["flag_cannon"] = gal["flag_cannon"].to_numpy().astype(np.int32)
    t["chi2_cannon"] = gal["chi2_cannon"].to_numpy().astype("f4")
    for k in range(1, 5):
        t[f"snr_c{k}"] = gal[f"snr_c{k}"].to_numpy().astype("f4")
    return t


def _plain_table(df, units=None, dtypes=None):
    from astropy.table import Table

    t = Table()
    for c in df.columns:
        v = df[c].to_numpy()
        if dtypes and c in dtypes:
            v = v.astype(dtypes[c])
        elif v.dtype == object:
            v = v.astype(str)
        t[c] = v
        if units and c in units:
            t[c].unit = units[c]
    return t


_TRUTH_COLUMNS = (
    "source_id", "designation", "sobject_id", "kind", "population", "phase", "cluster",
    "binary_id", "neighbour_of", "age", "mass", "teff", "logg", "vmic", "fe_h",
    *[f"{x}_fe" for x in ELEMENTS], "alpha_fe", "R_birth", "ra", "dec", "l", "b", "distance",
    "pmra", "pmdec", "rv", "x", "y", "z", "R", "phi", "vR", "vT", "vz", "ebv", "abs_g",
    "phot_g_mean_mag", "vmag", "bp_rp", "in_lamost", "n_obs", "in_galah", "galah_wrong",
    "wrong_labels")

_TRUTH_UNITS = {"age": "Gyr", "mass": "solMass", "teff": "K", "vmic": "km / s", "ra": "deg",
                "dec": "deg", "l": "deg", "b": "deg", "distance": "kpc", "pmra": "mas / yr",
                "pmdec": "mas / yr", "rv": "km / s", "x": "kpc", "y": "kpc", "z": "kpc",
                "R": "kpc", "phi": "deg", "vR": "km / s", "vT": "km / s", "vz": "km / s",
                "ebv": "mag", "abs_g": "mag", "phot_g_mean_mag": "mag", "vmag": "mag",
                "bp_rp": "mag", "R_birth": "kpc"}


def _truth_table(stars):
    from .chemistry import mean_alpha

    df = stars.copy()
    df["alpha_fe"] = mean_alpha(df)
    for c in _TRUTH_COLUMNS:
        if c not in df:
            df[c] = np.nan
    df = df[list(_TRUTH_COLUMNS)]
    for c in ("designation", "kind", "population", "phase", "cluster", "wrong_labels"):
        df[c] = df[c].fillna("").astype(str)
    for c in ("in_lamost", "in_galah", "galah_wrong"):
        df[c] = df[c].fillna(False).astype(bool)
    dtypes = {c: "f8" for c in _TRUTH_COLUMNS if c not in (
        "source_id", "designation", "sobject_id", "kind", "population", "phase", "cluster",
        "binary_id", "neighbour_of", "in_lamost", "n_obs", "in_galah", "galah_wrong",
        "wrong_labels")}
    dtypes.update({"source_id": "i8", "sobject_id": "i8", "binary_id": "i8", "neighbour_of": "i8",
                   "n_obs": "i4"})
    t = _plain_table(df, _TRUTH_UNITS, dtypes)
    t.meta["COMMENT"] = ["Mock universe truth: never read by the pipeline"]
    return t


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------

def generate(out_dir=None, size: str | None = None, seed: int | None = None, progress: bool = True,
             overwrite: bool = False, *, n_lamost: int | None = None,
             n_workers: int | None = None) -> Path:
    """Write the whole mock universe (spectra, catalogues, truth, manifest) and return its folder.

    Parameters
    ----------
    out_dir : path, optional
        Defaults to ``paths.raw_dir("mock")`` (``<data>/raw/mock``).
    size : {"tiny", "small", "large"}, optional
        Defaults to ``config.settings().size``. ``tiny`` is a few hundred LAMOST observations (for
        tests, seconds), ``small`` ~50,000 (the default, ~2-3 minutes on 2 cores), ``large``
        500,000 (streams to disk chunk by chunk).
    seed : int, optional
        Master seed; defaults to ``config.settings().seed``.
    progress : bool
        Show progress bars.
    overwrite : bool
        Regenerate even if a complete mock with the same parameters exists.
    n_lamost : int, optional
        Override the number of LAMOST observations (scale tests).
    n_workers : int, optional
        Processes for the spectra; defaults to ``config.settings().n_workers``. Does not change
        the output.

    Returns
    -------
    pathlib.Path of the mock's folder. Its ``manifest.json`` lists every file with size and
    sha256, the parameters and the counts.
    """
    from ..config import SIZES as CONFIG_SIZES
    from ..config import settings
    from . import surveys, writers

    s = settings()
    size = size or s.size
    if size not in CONFIG_SIZES:
        raise ValueError(f"size must be one of {CONFIG_SIZES}, got {size!r}")
    seed = s.seed if seed is None else int(seed)
    n_workers = max(1, int(n_workers or s.n_workers))
    out = Path(out_dir) if out_dir is not None else paths.raw_dir("mock")
    params = {"size": size, "seed": seed, "n_lamost": n_lamost, "version": __version__,
              "code": _code_hash()}

    if not overwrite and _is_complete(out, params):
        log.info("mock universe in %s is complete (size=%s, seed=%d); nothing to do", out, size, seed)
        return out
    if not _looks_like_mock(out):
        raise FileExistsError(f"{out} holds files that are not a mock universe; refusing to "
                              "overwrite it (choose another out_dir)")
    t0 = time.perf_counter()
    prog = out / _PROGRESS
    old = None
    if (prog / "params.json").exists():
        old = json.loads((prog / "params.json").read_text())
    if overwrite or old != params:
        _clear(out)
    for d in (*SUBDIRS, _PROGRESS):
        paths.ensure(out / d)
    paths.ensure(out / "lamost" / "spectra")
    writers.write_json(prog / "params.json", params)

    uni = surveys.build_universe(size, seed, n_lamost=n_lamost)
    lam, stars, gal = uni.lamost, uni.stars, uni.galah
    log.info("built the universe in %.1f s", time.perf_counter() - t0)
    seeds = surveys.seed_sequences(seed)

    # LAMOST spectra, chunk by chunk (finished chunks are skipped on a rerun)
    spec = surveys.SIZES[size]
    st = stars.loc[lam["star"].to_numpy()].reset_index(drop=True)
    work = lam.copy()
    for c in ("teff", "logg", "fe_h", "vmic", "ebv", *[f"{x}_fe" for x in ELEMENTS]):
        work[f"_true_{c}"] = st[c].to_numpy()
    cols_header = ["obsid", "filename", "obsdate", "lmjd", "mjd", "planid", "ra", "dec",
                   "designation", "fiberid", "spid", "source_id", "mag_g", "class", "subclass"]
    label_cols = ["teff", "logg", "vmic", "fe_h", *[f"{x}_fe" for x in ELEMENTS], "ebv"]
    chunk = spec.spectra_chunk
    sp = seeds["spectra"]
    tasks = []
    results = {}
    for i, a in enumerate(range(0, len(work), chunk)):
        done = prog / f"lamost_{i:05d}.json"
        if done.exists():
            results[i] = json.loads(done.read_text())
            continue
        w = work.iloc[a:a + chunk]
        df = w[cols_header].rename(columns={"class": "klass"})
        for c in label_cols:
            df[c] = w[f"_true_{c}"].to_numpy()
        df["rv"] = w["rv_obs"].to_numpy()
        df["snrg"] = w["snrg_target"].to_numpy()
        tasks.append((i, df.reset_index(drop=True), sp.entropy, sp.spawn_key + (i,),
                      str(out / "lamost" / "spectra"), str(out)))

    def _keep_lamost(res):
        results[res["index"]] = res
        writers.write_json(prog / f"lamost_{res['index']:05d}.json", res)

    _run_tasks(_lamost_task, tasks, n_workers, progress, "LAMOST spectra", _keep_lamost)

    # GALAH window spectra for the stars LAMOST also observed (the cross-match candidates)
    ov = gal[stars.loc[gal["star"].to_numpy(), "n_obs"].to_numpy() > 0]
    ov = ov.sort_values("sobject_id").reset_index(drop=True)
    truth_ov = stars.loc[ov["star"].to_numpy()].reset_index(drop=True)
    lab = ["teff", "logg", "vmic", "fe_h", *[f"{x}_fe" for x in ELEMENTS]]
    # GALAH's best-fit model spectra follow the reported labels without the dwarf systematics
    # (surveys.galah_dwarf_systematics): the model fits the spectrum, its physics carries the bias
    model_labels = ov[lab].copy()
    for x in ELEMENTS:
        if f"model_{x}_fe" in ov:
            model_labels[f"{x}_fe"] = ov[f"model_{x}_fe"].to_numpy()
    gs = seeds["galah_spectra"]
    gtasks, gres = [], {}
    for i, a in enumerate(range(0, len(ov), _GALAH_CHUNK)):
        done = prog / f"galah_{i:05d}.npz"
        if done.exists():
            with np.load(done) as z:
                gres[i] = {k: z[k] for k in z.files}
            continue
        sl = slice(a, a + _GALAH_CHUNK)
        gtasks.append((i, truth_ov.loc[truth_ov.index[sl], lab].reset_index(drop=True),
                       model_labels.loc[model_labels.index[sl]].reset_index(drop=True),
                       ov["snr_c2"].to_numpy()[sl].astype(float), gs.entropy, gs.spawn_key + (i,)))

    def _keep_galah(res):
        i = res.pop("index")
        gres[i] = res
        tmp = prog / f".galah_{i:05d}.tmp.npz"
        np.savez(tmp, **res)
        os.replace(tmp, prog / f"galah_{i:05d}.npz")

    _run_tasks(_galah_task, gtasks, n_workers, progress, "GALAH windows", _keep_galah)

    # catalogues
    records = []
    for i in sorted(results):
        records.extend(results[i]["records"])
    by_obsid = {}
    for i in sorted(results):
        r = results[i]
        for j, ob in enumerate(r["obsid"]):
            by_obsid[ob] = (r["z"][j], r["z_err"][j], *[r[f"snr{b}"][j] for b in "ugriz"])
    vals = np.array([by_obsid[int(o)] for o in lam["obsid"]])
    lam = lam.copy()
    lam["z"], lam["z_err"] = vals[:, 0], vals[:, 1]
    for k, b in enumerate("ugriz"):
        lam[f"snr{b}"] = vals[:, 2 + k]
    lam["rv"] = lam["z"] * surveys.C_KMS

    def put(rel, data):
        records.append(writers.write_bytes(out / rel, data, out))

    put("lamost/catalog.fits", writers.table_bytes(_lamost_catalog(lam), "CATALOG"))
    put("galah/catalog.fits", writers.table_bytes(_galah_catalog(gal.sort_values("sobject_id")),
                                                  "GALAH"))
    if gres:
        parts = [gres[i] for i in sorted(gres)]
        wave = parts[0]["wave"]
        flux = np.concatenate([p["flux"] for p in parts])
        sigma = np.concatenate([p["sigma"] for p in parts])
        model = np.concatenate([p["model"] for p in parts])
    else:
        from . import synth

        wave = synth.galah_windows_wavelength()
        flux = sigma = model = np.zeros((0, wave.size), np.float32)
    put("galah/window_spectra.fits",
        writers.window_spectra_bytes(wave, flux, sigma, model, ov["sobject_id"].to_numpy()))
    put("gaia/gaia_source.fits", writers.table_bytes(_plain_table(uni.gaia, {
        "ra": "deg", "dec": "deg", "ref_epoch": "yr", "parallax": "mas", "parallax_error": "mas",
        "pmra": "mas / yr", "pmra_error": "mas / yr", "pmdec": "mas / yr",
        "pmdec_error": "mas / yr", "radial_velocity": "km / s", "radial_velocity_error": "km / s",
        "phot_g_mean_mag": "mag"}), "GAIA_SOURCE"))
    put("gaia/distances.fits", writers.table_bytes(_plain_table(
        uni.distances, {"r_est": "pc", "r_lo": "pc", "r_hi": "pc"}), "DISTANCES"))
    put("binaries/wide_binaries.fits", writers.table_bytes(_plain_table(uni.binaries, {
        "ra1": "deg", "dec1": "deg", "ra2": "deg", "dec2": "deg", "sep_AU": "AU",
        "pairdistance": "deg", "phot_g_mean_mag1": "mag", "phot_g_mean_mag2": "mag"}),
        "WIDE_BINARIES"))
    put("clusters/members.fits", writers.table_bytes(_plain_table(
        uni.members, {"ra": "deg", "dec": "deg"}), "MEMBERS"))
    put("truth/truth.fits", writers.table_bytes(_truth_table(stars), "TRUTH"))

    records.sort(key=lambda r: r["path"])
    today = time.strftime("%Y-%m-%d", time.gmtime())
    for r in records:
        r["source"] = "mock"
        r["date"] = today
    counts = {
        "stars": int(len(stars)),
        "lamost_observations": int(len(lam)),
        "lamost_stars": int((stars["n_obs"] > 0).sum()),
        "lamost_repeat_stars": int((stars["n_obs"] > 1).sum()),
        "galah_stars": int(len(gal)),
        "overlap_candidates": int(len(ov)),
        "galah_wrong_labels": int(gal["galah_wrong"].sum()),
        "wide_binaries": int(len(uni.binaries)),
        "wide_binaries_both_lamost": int((
            stars.set_index("source_id").loc[uni.binaries["source_id2"], "n_obs"].to_numpy() > 0).sum()),
        "cluster_members": int(len(uni.members)),
        "cluster_members_lamost": int(((stars["cluster"] != "") & (stars["n_obs"] > 0)).sum()),
        "clusters_lamost": {name: int(n) for name, n in stars.loc[
            (stars["cluster"] != "") & (stars["n_obs"] > 0), "cluster"].value_counts().sort_index().items()},
        "gaia_sources": int(len(uni.gaia)),
    }
    manifest = {"source": "mock", "size": size, "seed": seed, "params": params,
                "created": today, "generator": f"lamostcannon.mock {__version__}",
                "seconds": round(time.perf_counter() - t0, 1), "counts": counts,
                "complete": True, "files": records}
    writers.write_json(out / _MANIFEST, manifest)
    shutil.rmtree(prog, ignore_errors=True)
    log.info("mock universe (%s, seed %d) written to %s in %.0f s", size, seed, out,
             time.perf_counter() - t0)
    return out


def manifest_summary(out_dir=None):
    """Files and bytes per folder of a generated mock, as a pandas DataFrame."""
    import pandas as pd

    man = read_manifest(out_dir)
    if man is None:
        raise FileNotFoundError(f"no manifest.json in {out_dir or paths.raw_dir('mock')}")
    df = pd.DataFrame(man["files"])
    df["folder"] = df["path"].map(lambda p: str(Path(p).parent))
    summ = df.groupby("folder").agg(files=("path", "size"), bytes=("size", "sum"))
    summ["MB"] = (summ["bytes"] / 1e6).round(2)
    return summ.drop(columns="bytes")
