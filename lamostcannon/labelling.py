"""The one labelling core: spectra + model(s) -> labels a user can trust or knows to distrust.

Both the catalogue (:func:`lamostcannon.catalog.label_chunk`, survey scale, chunked, resumable,
Dask) and the ``label`` command (:mod:`lamostcannon.cli`, a user's own files) call
:meth:`Labeller.label`; nothing below is fitted or flagged anywhere else.

For a chunk of continuum-normalised spectra on the common grid it

1. chooses the model: with one model, that model; with a dwarf and a giant model, paper eq. 1 on
   the LAMOST pipeline's teff and logg (:func:`lamostcannon.labels.is_giant`), and where the
   pipeline gave none (NaN, or LAMOST's -9999: :func:`lamostcannon.labels.pipeline_value`) both
   models, keeping the fit with the lower reduced chi2 (``NO_PIPELINE``);
2. runs the batched test step (:meth:`lamostcannon.cannon.CannonModel.test`) with the GALAH line
   windows of the model's abundance labels (``chi2_<x>_fe``);
3. turns the formal errors into calibrated ones (:mod:`lamostcannon.uncertainty`:
   ``e_<label>`` total, ``e_<label>_random``, ``e_<label>_formal``);
4. computes the S/N (:func:`lamostcannon.ood.spectrum_snr`), the window statistics and label
   density of the out-of-distribution score (:mod:`lamostcannon.ood`), the KDE extrapolation
   flags (``<label>_extrap``, ``kde_extrap``) and the training-range flag (``outside_training``);
5. sums it all up in ``quality_flag`` (:data:`QUALITY_BITS`; 0 = recommended for science).

Everything a model needs sits beside its file (:meth:`ModelBundle.load`): ``model_<name>.fits``,
``extrapolation_<name>.json`` (KDE boundaries, notebook 04/09), ``uncertainty_<name>.json``
(error model and label skill) and ``ood_<name>.json`` (OOD calibration). Missing companions are
allowed: the corresponding columns then say "not calibrated" (formal errors, no KDE bits, NaN
score) and a warning is logged.

``quality_flag`` bits
---------------------
====  ====================  ===================================================================
   1  ``KDE_EXTRAP``        teff, logg or [Fe/H] beyond its KDE extrapolation boundary (paper
                            section 4) or clipped at the test step's bound; every label has its
                            own ``<label>_extrap`` (the same for that label), which per-label
                            selections honour (:func:`lamostcannon.maps.quality_mask`)
   2  ``OUTSIDE_TRAINING``  teff, logg or [Fe/H] outside the range of the training labels
   4  ``AT_BOUND``          a label with CV skill was clipped at the test step's bound
                            (``min - 1`` or ``max + 1`` training standard deviations)
   8  ``NOT_CONVERGED``     the Newton iteration of the test step did not converge
  16  ``MULTIPLE_MINIMA``   another start of the test step found a distinct minimum (delta chi2
                            < 1, more than 2 formal errors away in some label)
  32  ``POOR_FIT``          chi2 per pixel high for a training spectrum of that S/N
  64  ``UNLIKE_TRAINING``   ``ood_score`` above the calibrated threshold
 128  ``NO_PIPELINE``       no LAMOST pipeline teff/logg: model chosen by the lower reduced chi2
 256  ``LOW_SNR``           ``snr`` below :data:`SNR_LOW`
 512  ``FIT_FAILED``        too few usable pixels, non-finite labels or a covariance that is
                            not positive definite
1024  ``NOT_STELLAR``       the LAMOST pipeline classifies the spectrum as not a star (``class``
                            GALAXY, QSO or Unknown) or its redshift ``|z|`` exceeds
                            :data:`Z_MAX_STELLAR` (no star of the Galaxy moves that fast)
====  ====================  ===================================================================
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import labels as labelsets

log = logging.getLogger(__name__)

__all__ = ["QF_KDE_EXTRAP", "QF_OUTSIDE_TRAINING", "QF_AT_BOUND", "QF_NOT_CONVERGED",
           "QF_MULTIPLE_MINIMA", "QF_POOR_FIT", "QF_UNLIKE_TRAINING", "QF_NO_PIPELINE",
           "QF_LOW_SNR", "QF_FIT_FAILED", "QF_NOT_STELLAR", "QUALITY_BITS", "SNR_LOW",
           "Z_MAX_STELLAR", "STELLAR_FLAG_LABELS",
           "companion_path", "ModelBundle", "Labeller", "quality_flag_description",
           "describe_quality", "ModelSpectraWriter", "predict_rows", "not_stellar"]

QF_KDE_EXTRAP = 1
QF_OUTSIDE_TRAINING = 2
QF_AT_BOUND = 4
QF_NOT_CONVERGED = 8
QF_MULTIPLE_MINIMA = 16
QF_POOR_FIT = 32
QF_UNLIKE_TRAINING = 64
QF_NO_PIPELINE = 128
QF_LOW_SNR = 256
QF_FIT_FAILED = 512
QF_NOT_STELLAR = 1024

#: bit -> (name, meaning); 0 = recommended for science.
QUALITY_BITS = {
    QF_KDE_EXTRAP: ("KDE_EXTRAP", "teff, logg or [Fe/H] beyond its KDE extrapolation boundary"),
    QF_OUTSIDE_TRAINING: ("OUTSIDE_TRAINING", "teff, logg or [Fe/H] outside the training range"),
    QF_AT_BOUND: ("AT_BOUND", "a label with CV skill clipped at the test step's bound"),
    QF_NOT_CONVERGED: ("NOT_CONVERGED", "the test step did not converge"),
    QF_MULTIPLE_MINIMA: ("MULTIPLE_MINIMA", "another start found a distinct minimum"),
    QF_POOR_FIT: ("POOR_FIT", "chi2 per pixel high for a training spectrum of that S/N"),
    QF_UNLIKE_TRAINING: ("UNLIKE_TRAINING", "ood_score above the calibrated threshold"),
    QF_NO_PIPELINE: ("NO_PIPELINE", "no LAMOST pipeline teff/logg; model chosen by chi2"),
    QF_LOW_SNR: ("LOW_SNR", "snr below the minimum S/N"),
    QF_FIT_FAILED: ("FIT_FAILED", "too few pixels, non-finite labels or covariance not PD"),
    QF_NOT_STELLAR: ("NOT_STELLAR", "pipeline class not STAR, or |z| > 0.005"),
}

#: Minimum ``snr`` (median flux * sqrt(ivar) of the normalised spectrum, about 1.3 x LAMOST's
#: ``snrg``); below it ``LOW_SNR``. Chosen from notebook 09: under it the real spectra's labels
#: scatter by several hundred K and non-stars can no longer be told from stars.
SNR_LOW = 8.0

#: Largest pipeline redshift of a Milky Way star (|cz| = 1500 km/s, beyond any Galactic star's
#: radial velocity); above it ``NOT_STELLAR``.
Z_MAX_STELLAR = 0.005

#: Labels whose KDE and training-range flags set ``KDE_EXTRAP`` / ``OUTSIDE_TRAINING``.
STELLAR_FLAG_LABELS = ("teff", "logg", "fe_h")

_CANNON_FAILED = 1 | 16 | 32       # cannon NO_PIXELS, COV_NOT_PD, FEW_PIXELS


def quality_flag_description() -> str:
    """One line: every bit of ``quality_flag`` (for FITS column descriptions)."""
    return "bitmask, 0 = recommended for science: " + "; ".join(
        f"{b}={n}" for b, (n, _) in QUALITY_BITS.items())


def describe_quality(flags) -> pd.DataFrame:
    """Fraction of rows carrying each ``quality_flag`` bit (and ``any``)."""
    f = np.asarray(flags).astype(np.int64)
    rows = [{"bit": b, "name": n, "fraction": float(np.mean((f & b) != 0)) if f.size else np.nan}
            for b, (n, _) in QUALITY_BITS.items()]
    rows.append({"bit": 0, "name": "any", "fraction": float(np.mean(f != 0)) if f.size else np.nan})
    return pd.DataFrame(rows).set_index("name")


# --------------------------------------------------------------------------------------------
# Models and their companion files
# --------------------------------------------------------------------------------------------

_COMPANIONS = ("extrapolation", "uncertainty", "ood")


def companion_path(model_path, kind: str) -> Path | None:
    """A calibration file stored beside a model, or None.

    Looked for, in order: ``<stem>.<kind>.json`` and, for a model named ``model_<name>.<ext>``,
    ``<kind>_<name>.json``; ``kind`` is ``extrapolation`` (KDE boundaries), ``uncertainty``
    (error model, label skill) or ``ood`` (OOD calibration).
    """
    if kind not in _COMPANIONS:
        raise ValueError(f"kind must be one of {_COMPANIONS}, got {kind!r}")
    model_path = Path(model_path)
    stem = model_path.name.split(".")[0]
    candidates = [model_path.with_name(f"{stem}.{kind}.json")]
    if stem.startswith("model_"):
        candidates.append(model_path.with_name(f"{kind}_{stem[len('model_'):]}.json"))
    for c in candidates:
        if c.is_file():
            return c
    return None


def _file_hash(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@dataclass
class ModelBundle:
    """One trained model and what sits beside it.

    Attributes
    ----------
    name : str
        ``dwarf``, ``giant`` or any name (the ``model`` column of the output).
    model : CannonModel
    windows : dict label -> bool (P,)
        GALAH line windows of the abundance labels (``chi2_<x>_fe``).
    boundaries : dict label -> (low, high), or None
    errors : :class:`lamostcannon.uncertainty.ErrorModel` or None
    ood : :class:`lamostcannon.ood.OODCalibration` or None
    sources : dict
        Which files were read (for the fingerprint and table headers).
    """

    name: str
    model: object
    windows: dict = field(default_factory=dict)
    boundaries: dict | None = None
    errors: object = None
    ood: object = None
    sources: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def label_names(self) -> list:
        return list(self.model.label_names)

    @property
    def wavelength(self):
        wl = getattr(self.model, "wavelength", None)
        if wl is None:
            from .spectra import common_wavelength

            wl = common_wavelength()
        return wl

    @classmethod
    def from_model(cls, model, name: str = "model", *, boundaries=None, errors=None, ood=None,
                   windows=None):
        """Bundle an in-memory model (windows default to the GALAH windows of its labels)."""
        if windows is None:
            windows = element_windows(getattr(model, "wavelength", None), model.label_names)
        return cls(name, model, windows, boundaries, errors, ood)

    @classmethod
    def load(cls, path, name: str | None = None, *, boundaries_path=None, require=()):
        """Read a model file and its companions (:func:`companion_path`).

        Parameters
        ----------
        path : path
            ``CannonModel.write`` output.
        name : str, optional
            Default: ``<name>`` of ``model_<name>.*``, else the file stem.
        boundaries_path : path, optional
            KDE boundaries to use instead of the companion file.
        require : sequence of str
            Companion kinds that must exist (``"uncertainty"``, ``"ood"``, ``"extrapolation"``).

        Raises
        ------
        FileNotFoundError
            The model, or a required companion, is missing.
        ValueError
            A file cannot be read.
        """
        from . import ood as _ood
        from . import uncertainty, validation
        from .cannon import CannonModel

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no model file at {path}")
        stem = path.name.split(".")[0]
        name = name or (stem[len("model_"):] if stem.startswith("model_") else stem)
        model = CannonModel.read(path)
        found = {k: companion_path(path, k) for k in _COMPANIONS}
        if boundaries_path is not None:
            found["extrapolation"] = Path(boundaries_path)
        for kind in require:
            if found.get(kind) is None:
                raise FileNotFoundError(f"no {kind} calibration beside {path} "
                                        f"({kind}_{name}.json); run the notebook that writes it")
        for kind, p in found.items():
            if p is None:
                log.warning("no %s calibration beside %s: %s", kind, path,
                            {"extrapolation": "no KDE extrapolation flags",
                             "uncertainty": "e_<label> are the formal errors",
                             "ood": "no ood_score, POOR_FIT or UNLIKE_TRAINING"}[kind])
        boundaries = validation.read_boundaries(found["extrapolation"]) \
            if found["extrapolation"] else None
        errors = uncertainty.read_error_model(found["uncertainty"]) \
            if found["uncertainty"] else None
        ood = _ood.read_calibration(found["ood"]) if found["ood"] else None
        bundle = cls.from_model(model, name, boundaries=boundaries, errors=errors, ood=ood)
        bundle.sources = {"model": str(path), **{k: str(v) for k, v in found.items() if v}}
        return bundle

    def skilled_labels(self) -> list:
        """Labels with CV skill (:func:`lamostcannon.uncertainty.assess_skill`), model order."""
        return self.errors.skilled(self.label_names) if self.errors is not None \
            else self.label_names

    def unskilled_labels(self) -> list:
        ok = set(self.skilled_labels())
        return [n for n in self.label_names if n not in ok]

    def fingerprint(self) -> dict:
        """What must not change between a run and its resumption."""
        m = self.model
        mid = getattr(m, "training_hash", None) or _hash_arrays(np.asarray(m.theta))
        return {
            "model": str(mid),
            "windows": _hash_arrays(*[w for _, w in sorted(self.windows.items())]),
            "boundaries": _json_hash(self.boundaries),
            "errors": _json_hash(None if self.errors is None else self.errors.to_dict()
                                 .get("labels")),
            "ood": _json_hash(None if self.ood is None else {
                k: v for k, v in self.ood.to_dict().items() if k != "provenance"}),
        }

    # cached per-bundle work arrays
    def _ood_binner(self):
        if "binner" not in self._cache:
            from .ood import _Binner

            self._cache["binner"] = _Binner(self.model, self.ood.masks(self.wavelength))
        return self._cache["binner"]


def element_windows(wavelength, label_names) -> dict:
    """GALAH line windows (paper Table 2) of a model's abundance labels (``chi2_<x>_fe``)."""
    from . import cleaning

    if wavelength is None:
        from .spectra import common_wavelength

        wavelength = common_wavelength()
    windows = cleaning.label_windows(np.asarray(wavelength, dtype=float), label_names)
    for name, mask in windows.items():
        if not mask.any():
            log.warning("no pixel of the grid falls in the %s windows", name)
    return windows


def _hash_arrays(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def code_fingerprint() -> str:
    """Hash of the source of the modules that turn a spectrum into labels (``cannon``,
    ``labelling``, ``uncertainty``, ``ood``). It is part of :meth:`Labeller.fingerprint`, so a
    resumed catalogue run never mixes parts labelled by different versions of that code."""
    global _CODE_FINGERPRINT
    if _CODE_FINGERPRINT is None:
        from . import cannon, ood, uncertainty

        h = hashlib.sha256()
        for module in (cannon, ood, uncertainty):
            h.update(Path(module.__file__).read_bytes())
        h.update(Path(__file__).read_bytes())
        _CODE_FINGERPRINT = h.hexdigest()[:16]
    return _CODE_FINGERPRINT


_CODE_FINGERPRINT = None


def _json_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The labeller
# --------------------------------------------------------------------------------------------

@dataclass
class Labeller:
    """Models plus the settings of the test step; :meth:`label` is the labelling core.

    Attributes
    ----------
    models : dict name -> ModelBundle
        One model, or exactly ``dwarf`` and ``giant`` (eq. 1 chooses between them).
    min_pixels : int
        Spectra with fewer usable pixels are not fitted (``FIT_FAILED``, labels NaN).
    snr_low : float
        ``LOW_SNR`` below this ``snr``.
    test_kwargs : dict
        Keyword arguments of ``CannonModel.test`` (256 spectra per batch is fastest on 1 thread).
    """

    models: dict
    min_pixels: int = 100
    snr_low: float = SNR_LOW
    test_kwargs: dict = field(default_factory=lambda: {"chunk_size": 256})

    def __post_init__(self):
        if not self.models:
            raise ValueError("need at least one model")
        if len(self.models) > 1 and set(self.models) != {"dwarf", "giant"}:
            raise ValueError(f"with more than one model they must be named 'dwarf' and 'giant' "
                             f"(eq. 1 chooses between them), got {sorted(self.models)}")

    @property
    def two_models(self) -> bool:
        return len(self.models) == 2

    @property
    def label_names(self) -> list:
        """Union of the models' labels (dwarf first)."""
        order = ["dwarf", "giant"] if self.two_models else list(self.models)
        return list(dict.fromkeys(n for g in order for n in self.models[g].label_names))

    @property
    def window_names(self) -> list:
        order = ["dwarf", "giant"] if self.two_models else list(self.models)
        return list(dict.fromkeys(n for g in order for n in self.models[g].windows))

    def fingerprint(self) -> dict:
        return {"models": {k: b.fingerprint() for k, b in sorted(self.models.items())},
                "code": code_fingerprint(),
                "min_pixels": int(self.min_pixels), "snr_low": float(self.snr_low),
                "test_kwargs": json.dumps(self.test_kwargs, sort_keys=True, default=str)}

    def columns(self) -> dict:
        """Output columns of :meth:`label` and their dtypes (the same for every chunk)."""
        names = self.label_names
        cols = {"model": "str", "snr": "float64"}
        cols.update({n: "float64" for n in names})
        for suffix in ("", "_random", "_formal"):
            cols.update({f"e_{n}{suffix}": "float64" for n in names})
        cols.update({"chi2": "float64", "chi2_per_pixel": "float64"})
        cols.update({f"chi2_{w}": "float64" for w in self.window_names})
        cols.update({"n_pixels": "int32", "n_iter": "int32", "converged": "bool",
                     "cannon_flag": "int64", "ood_score": "float64"})
        cols.update({f"{n}_extrap": "bool" for n in names})
        cols.update({"kde_extrap": "bool", "outside_training": "bool", "quality_flag": "int32"})
        return cols

    def empty(self, n: int = 0) -> pd.DataFrame:
        return pd.DataFrame(empty_arrays(self.columns(), n))

    # ---- the core -------------------------------------------------------------------------
    def label(self, flux, ivar, pipeline_teff=None, pipeline_logg=None, pipeline_class=None,
              redshift=None) -> pd.DataFrame:
        """Labels, errors, scores and flags of a chunk of spectra (no I/O; deterministic).

        Parameters
        ----------
        flux, ivar : arrays (S, P)
            Continuum-normalised flux and inverse variance on the models' grid. NaN/inf and
            negative ivar are masked.
        pipeline_teff, pipeline_logg : arrays (S,), optional
            LAMOST pipeline (LASP) teff (K) and logg for the model choice of eq. 1 (two models
            only); non-physical values count as missing.
        pipeline_class, redshift : arrays (S,), optional
            LAMOST pipeline ``class`` (STAR, GALAXY, QSO, Unknown) and redshift ``z`` of each
            spectrum (file header or catalogue), for ``NOT_STELLAR``; missing values never flag.

        Returns
        -------
        DataFrame (S rows, input order) with :meth:`columns`. Labels a row's model does not
        estimate are NaN.
        """
        flux = np.asarray(flux, dtype=np.float32)
        ivar = np.asarray(ivar, dtype=np.float32)
        if flux.ndim != 2 or flux.shape != ivar.shape:
            raise ValueError(f"flux {flux.shape} and ivar {ivar.shape} must both be (S, P)")
        n = flux.shape[0]
        for name, values in (("pipeline_teff", pipeline_teff), ("pipeline_logg", pipeline_logg),
                             ("pipeline_class", pipeline_class), ("redshift", redshift)):
            if values is not None and np.shape(values) != (n,):
                # a length-1 array would broadcast: every spectrum routed like the first one
                raise ValueError(f"{name} has shape {np.shape(values)}, expected ({n},): one "
                                 "value per spectrum")
        # bad input (NaN/inf flux or ivar, negative ivar) is masked by the test step, the S/N
        # and the window statistics themselves: no full copy of the chunk here
        columns = self.columns()
        out = empty_arrays(columns, n)
        qf = np.zeros(n, np.int32)
        from .ood import spectrum_snr

        snr = spectrum_snr(flux, ivar)
        out["snr"] = snr
        with np.errstate(invalid="ignore"):
            qf |= np.where(~(snr >= self.snr_low), QF_LOW_SNR, 0).astype(np.int32)
        qf |= np.where(not_stellar(pipeline_class, redshift, n), QF_NOT_STELLAR,
                       0).astype(np.int32)

        # model choice
        if self.two_models:
            if pipeline_teff is None or pipeline_logg is None:
                pipeline_teff = pipeline_logg = np.full(n, np.nan)
            known = labelsets.pipeline_known(pipeline_teff, pipeline_logg)
            giant = np.asarray(labelsets.is_giant(pipeline_teff, pipeline_logg), bool) & known
            candidates = {"dwarf": ~giant | ~known, "giant": giant | ~known}
        else:
            known = np.ones(n, bool)
            (only,) = self.models
            candidates = {only: np.ones(n, bool)}

        fits = {}
        # the compiled Newton iteration for chunks that repay loading it (decided on the chunk,
        # not on each model's share of it; lamostcannon.kernels.NEWTON_MIN_SPECTRA)
        from .kernels import NEWTON_MIN_SPECTRA

        compiled = n >= NEWTON_MIN_SPECTRA
        for name, cand in candidates.items():
            bundle = self.models[name]
            idx = np.flatnonzero(cand)
            if idx.size == n:     # every spectrum: no copy of the chunk
                fit = self._fit(bundle, flux, ivar, compiled)
            else:
                fit = self._fit(bundle, flux[idx], ivar[idx], compiled) if idx.size else None
            usable = np.zeros(n, bool)
            if fit is not None:   # fewer than min_pixels usable pixels: not a fit
                enough = fit["n_pixels"] >= self.min_pixels
                usable[idx] = enough
                if not enough.all():
                    fit["labels"][~enough] = np.nan
                    fit["err"][~enough] = np.nan
                    fit["chi2"][~enough] = np.nan
                    fit["n_pixels"][~enough] = 0
                    fit["cannon_flag"][~enough] |= 1
                    for v in (*fit["chi2_windows"].values(), *fit["binned"].values()):
                        v[~enough] = np.nan
            fits[name] = (idx, fit, usable)

        chosen = np.full(n, next(iter(candidates)), dtype=object)
        if self.two_models:
            chosen[:] = np.where(giant, "giant", "dwarf")
            if (~known).any():
                rchi2 = {}
                for name, (idx, fit, _) in fits.items():
                    r = np.full(n, np.inf)
                    if fit is not None:
                        with np.errstate(invalid="ignore", divide="ignore"):
                            r[idx] = fit["chi2"] / fit["n_pixels"]
                    rchi2[name] = np.where(np.isfinite(r), r, np.inf)
                pick = np.where(rchi2["giant"] < rchi2["dwarf"], "giant", "dwarf")
                chosen[~known] = pick[~known]
            qf |= np.where(known, 0, QF_NO_PIPELINE).astype(np.int32)
        out["model"] = chosen

        for name, (idx, fit, usable) in fits.items():
            mine = chosen == name
            qf |= np.where(mine & ~usable, QF_FIT_FAILED, 0).astype(np.int32)
            if fit is None:
                continue
            keep = mine[idx]
            rows = idx[keep]
            if rows.size == 0:
                continue
            part = fit if keep.all() else {k: _take(v, keep) for k, v in fit.items()}
            self._fill(out, qf, self.models[name], rows, part, snr[rows])
        out["quality_flag"] = qf
        return typed_frame(out, columns)

    def _fit(self, bundle, flux, ivar, compiled=None) -> dict:
        kwargs = dict(self.test_kwargs)
        kwargs.setdefault("compiled", compiled)
        if bundle.ood is not None:   # the OOD window statistics, inside the batched test step
            kwargs["residual_bins"] = bundle._ood_binner()
        res = bundle.model.test(flux, ivar, windows=bundle.windows or None, **kwargs)
        L = len(bundle.label_names)
        s = flux.shape[0]
        cov = np.asarray(res.cov, dtype=float).reshape(s, L, L)
        with np.errstate(invalid="ignore"):
            err = np.sqrt(np.clip(np.diagonal(cov, axis1=1, axis2=2), 0, None))
        return {"labels": np.asarray(res.labels, dtype=float).reshape(s, L), "err": err,
                "chi2": np.asarray(res.chi2, dtype=float),
                "chi2_windows": {k: np.asarray(v, dtype=float) for k, v in
                                 dict(res.chi2_windows).items()},
                "n_pixels": np.asarray(res.n_pixels).astype(np.int32),
                "n_iter": np.asarray(res.n_iter).astype(np.int32),
                "converged": np.asarray(res.converged, dtype=bool),
                "cannon_flag": np.asarray(res.flag).astype(np.int64),
                "binned": {f"ood_{k}": np.asarray(v, dtype=float) for k, v in
                           dict(getattr(res, "binned", {}) or {}).items()}}

    def _fill(self, out, qf, bundle, rows, fit, snr):
        """Write one model's fits of ``rows`` into the output columns; set their bits."""
        names = bundle.label_names
        values, err = fit["labels"], fit["err"]
        for j, n in enumerate(names):
            out[n][rows] = values[:, j]
            out[f"e_{n}_formal"][rows] = err[:, j]
        if bundle.errors is not None:
            tot, ran = bundle.errors.apply(names, err, snr)
        else:
            tot = ran = err
        for j, n in enumerate(names):
            out[f"e_{n}"][rows] = tot[:, j]
            out[f"e_{n}_random"][rows] = ran[:, j]
        chi2 = fit["chi2"]
        npix = fit["n_pixels"]
        out["chi2"][rows] = chi2
        with np.errstate(invalid="ignore", divide="ignore"):
            cpp = np.where(npix > 0, chi2 / np.maximum(npix, 1), np.nan)
        out["chi2_per_pixel"][rows] = cpp
        for w, v in fit["chi2_windows"].items():
            if f"chi2_{w}" in out:
                out[f"chi2_{w}"][rows] = v
        out["n_pixels"][rows] = npix
        out["n_iter"][rows] = fit["n_iter"]
        out["converged"][rows] = fit["converged"]
        cflag = fit["cannon_flag"]
        out["cannon_flag"][rows] = cflag
        finite = np.all(np.isfinite(values), axis=1)
        bits = np.zeros(rows.size, np.int32)
        bits |= np.where((cflag & _CANNON_FAILED) != 0, QF_FIT_FAILED, 0).astype(np.int32)
        bits |= np.where(finite, 0, QF_FIT_FAILED).astype(np.int32)
        bits |= np.where(fit["converged"] | ~finite, 0, QF_NOT_CONVERGED).astype(np.int32)
        bits |= np.where((cflag & 64) != 0, QF_MULTIPLE_MINIMA, 0).astype(np.int32)

        stellar = [n for n in STELLAR_FLAG_LABELS if n in names] or names
        skilled = set(bundle.skilled_labels())
        at_bound = self._at_bound(bundle, values)
        if at_bound is None:  # a model without bounds information: the Cannon bit for any label
            bits |= np.where((cflag & 4) != 0, QF_AT_BOUND, 0).astype(np.int32)
            at_bound = np.zeros(values.shape, bool)
        else:  # AT_BOUND when a label with CV skill was clipped
            sk = np.array([n in skilled for n in names])
            bits |= np.where((at_bound & sk).any(axis=1), QF_AT_BOUND, 0).astype(np.int32)
        kde = np.zeros(rows.size, bool)
        for j, n in enumerate(names):
            e = at_bound[:, j].copy()  # a clipped label extrapolates by construction
            if bundle.boundaries is not None and n in bundle.boundaries:
                lo, hi = bundle.boundaries[n]
                with np.errstate(invalid="ignore"):
                    e |= (values[:, j] < lo) | (values[:, j] > hi)
            out[f"{n}_extrap"][rows] = e
            if n in stellar:
                kde |= e
        out["kde_extrap"][rows] = kde
        bits |= np.where(kde, QF_KDE_EXTRAP, 0).astype(np.int32)
        lr = getattr(bundle.model, "label_range", None)
        outside = np.zeros(rows.size, bool)
        if lr is not None:
            lr = np.asarray(lr, float)
            for n in stellar:
                j = names.index(n)
                with np.errstate(invalid="ignore"):
                    outside |= (values[:, j] < lr[0, j]) | (values[:, j] > lr[1, j])
        out["outside_training"][rows] = outside
        bits |= np.where(outside, QF_OUTSIDE_TRAINING, 0).astype(np.int32)

        cal = bundle.ood
        if cal is not None and rows.size:
            stats = dict(fit["binned"])
            if cal.density is not None:
                stats["ood_log_density"] = cal.density.log_density(values, names)
            score = cal.score(stats, snr)
            out["ood_score"][rows] = score
            with np.errstate(invalid="ignore"):
                bits |= np.where(score > cal.threshold, QF_UNLIKE_TRAINING, 0).astype(np.int32)
                if "chi2_per_pixel" in cal.lines:
                    zc = cal.z("chi2_per_pixel", cpp, snr)
                    bits |= np.where(zc > cal.poor_fit_threshold, QF_POOR_FIT, 0).astype(np.int32)
        qf[rows] |= bits

    def _at_bound(self, bundle, values):
        """(S, L) bool: the label sits on the test step's bound (``min - bound`` or
        ``max + bound`` standard deviations of the training labels); None without the model's
        scaler and training range."""
        model = bundle.model
        scaler, lr = getattr(model, "scaler", None), getattr(model, "label_range", None)
        if scaler is None or lr is None or not hasattr(scaler, "transform"):
            return None
        bound = float(self.test_kwargs.get("bound", 1.0))
        lr = np.asarray(lr, float)
        lo, hi = scaler.transform(lr[0]) - bound, scaler.transform(lr[1]) + bound
        with np.errstate(invalid="ignore"):
            x = scaler.transform(np.where(np.isfinite(values), values, scaler.mean))
            span = hi - lo
            at = (x <= lo + 1e-6 * span) | (x >= hi - 1e-6 * span)
        return at & np.isfinite(values)

    # ---- model spectra --------------------------------------------------------------------
    def predict(self, table: pd.DataFrame) -> np.ndarray:
        """Model flux (S, P) at the labels of rows of :meth:`label` output (NaN where unfitted)."""
        return predict_rows(self.models, table)


def empty_arrays(columns: dict, n: int) -> dict:
    """One array of ``n`` rows per column of ``columns`` (name -> dtype name): NaN for
    ``float64``, False, 0, or ``""`` (object) for ``str``."""
    data = {}
    for name, dtype in columns.items():
        if dtype == "float64":
            data[name] = np.full(n, np.nan)
        elif dtype == "bool":
            data[name] = np.zeros(n, bool)
        elif dtype == "str":
            data[name] = np.full(n, "", dtype=object)
        else:
            data[name] = np.zeros(n, dtype=dtype)
    return data


def typed_frame(data: dict, columns: dict) -> pd.DataFrame:
    """``pd.DataFrame(data).astype(columns)`` (the same frame), without pandas' per-column
    ``astype`` where an array already has its dtype.

    ``DataFrame.astype`` with a dict walks every column through pandas' casting machinery
    (tens of microseconds a column whether it changes or not: ~0.003 ms per observation for
    the catalogue's two frames of ~90 columns in chunks of 2048); here only the ``str`` columns
    and values that are not a numpy array of their dtype are cast, each by pandas' own
    ``astype``.

    Parameters
    ----------
    data : dict name -> array (S,)
        At least the names of ``columns``; in ``columns``' order in the result.
    columns : dict name -> dtype name (``"float64"``, ``"int32"``, ``"bool"``, ``"str"``, ...)
    """
    typed = {}
    for name, dtype in columns.items():
        values = data[name]
        if dtype != "str" and isinstance(values, np.ndarray) and values.ndim == 1 \
                and values.dtype == np.dtype(dtype):
            typed[name] = values
        else:
            typed[name] = pd.Series(values).astype(dtype)
    return pd.DataFrame(typed)


def not_stellar(pipeline_class=None, redshift=None, n: int | None = None) -> np.ndarray:
    """True where the LAMOST pipeline says "not a star": ``class`` other than STAR (GALAXY,
    QSO, Unknown; empty or missing does not count) or ``|z| > Z_MAX_STELLAR``."""
    size = n if n is not None else len(pipeline_class if pipeline_class is not None else redshift)
    out = np.zeros(size, bool)
    if pipeline_class is not None:
        c = np.asarray([("" if v is None or (isinstance(v, float) and np.isnan(v)) else
                         (v.decode() if isinstance(v, bytes) else str(v))).strip().upper()
                        for v in pipeline_class])
        out |= (c != "") & (c != "STAR") & (c != "NAN") & (c != "NONE")
    if redshift is not None:
        from .labels import pipeline_value

        z = pipeline_value(redshift, "z")
        with np.errstate(invalid="ignore"):
            out |= np.abs(z) > Z_MAX_STELLAR
    return out


def predict_rows(models: dict, table: pd.DataFrame) -> np.ndarray:
    """Model flux at each row's labels, with the model named in its ``model`` column."""
    table = table.reset_index(drop=True)
    first = next(iter(models.values()))
    P = first.model.theta.shape[0]
    out = np.full((len(table), P), np.nan, dtype=np.float32)
    names = table["model"].astype(str).to_numpy() if "model" in table else \
        np.full(len(table), next(iter(models)))
    for name, bundle in models.items():
        sel = np.flatnonzero(names == name)
        if sel.size == 0:
            continue
        lab = table.loc[sel, bundle.label_names].to_numpy(float)
        ok = np.all(np.isfinite(lab), axis=1)
        if ok.any():
            out[sel[ok]] = bundle.model.predict(lab[ok])
    return out


def _take(v, keep):
    if isinstance(v, dict):
        return {k: x[keep] for k, x in v.items()}
    return v[keep]


# --------------------------------------------------------------------------------------------
# The best-fit model spectra file
# --------------------------------------------------------------------------------------------

class ModelSpectraWriter:
    """One FITS file of data and best-fit model spectra, rows = stars, written incrementally.

    HDUs: ``WAVELENGTH`` (P,) vacuum rest-frame Angstrom; ``FLUX``, ``IVAR`` (the
    continuum-normalised data) and ``MODEL`` (the model flux at the fitted labels; NaN where the
    fit failed), each (N, P) float32; ``STARS`` a table with one row per spectrum in the same
    order (identifiers, model, labels, ``quality_flag``). Chunks go to temporary ``.npy`` files
    beside the output (bounded memory) and are streamed into the FITS file by :meth:`close`,
    which writes to a temporary name and renames it into place.

    Parameters
    ----------
    path : path
        The ``.fits`` file.
    wavelength : array (P,)
    """

    def __init__(self, path, wavelength):
        import tempfile

        self.path = Path(path)
        self.wavelength = np.asarray(wavelength, dtype=float)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        self._parts = []
        self._tables = []

    def add(self, table: pd.DataFrame, flux, ivar, model_flux):
        """Append rows (a DataFrame of per-star columns) with their spectra (n, P)."""
        n = len(table)
        for name, a in (("flux", flux), ("ivar", ivar), ("model", model_flux)):
            a = np.asarray(a, dtype=np.float32)
            if a.shape != (n, self.wavelength.size):
                raise ValueError(f"{name} has shape {a.shape}, expected ({n}, "
                                 f"{self.wavelength.size})")
        k = len(self._parts)
        files = []
        for name, a in (("flux", flux), ("ivar", ivar), ("model", model_flux)):
            f = self._dir / f"{k:06d}_{name}.npy"
            np.save(f, np.asarray(a, dtype=np.float32))
            files.append(f)
        self._parts.append((n, files))
        self._tables.append(table.reset_index(drop=True))

    @property
    def n_rows(self) -> int:
        return sum(n for n, _ in self._parts)

    def close(self, meta=None) -> Path:
        """Stream every part into the FITS file; returns its path."""
        import shutil
        import warnings

        from astropy.io import fits
        from astropy.table import Table

        N, P = self.n_rows, self.wavelength.size
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            primary = fits.PrimaryHDU()
            primary.header["CONTENT"] = ("data and best-fit Cannon model spectra", "")
            from . import __version__

            primary.header["LCVERS"] = (__version__, "lamostcannon version")
            for k, v in (meta or {}).items():
                primary.header[str(k)[:8].upper()] = str(v)[:68]
            hdus = [primary, fits.ImageHDU(self.wavelength, name="WAVELENGTH")]
            hdus[1].header["BUNIT"] = ("Angstrom", "vacuum, rest frame")
            fits.HDUList(hdus).writeto(tmp, overwrite=True)
            for name, k, comment in (("FLUX", 0, "continuum-normalised flux"),
                                     ("IVAR", 1, "inverse variance of FLUX"),
                                     ("MODEL", 2, "model flux at the fitted labels")):
                header = fits.ImageHDU(np.zeros((1, P), np.float32), name=name).header
                header["NAXIS2"] = N
                header["COMMENT"] = comment
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    shdu = fits.StreamingHDU(str(tmp), header)
                    for n, files in self._parts:
                        if n:
                            shdu.write(np.load(files[k]))
                    shdu.close()
            table = pd.concat(self._tables, ignore_index=True) if self._tables else pd.DataFrame()
            t = Table.from_pandas(table) if len(table.columns) else Table()
            for c in t.colnames:
                if t[c].dtype.kind == "O":
                    t[c] = t[c].astype(str)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                stars = fits.table_to_hdu(t)
                stars.name = "STARS"
                fits.append(tmp, stars.data, stars.header)
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()
            shutil.rmtree(self._dir, ignore_errors=True)
        log.info("wrote %s (%d spectra)", self.path, N)
        return self.path

    def abort(self):
        """Remove the temporary parts (no output)."""
        import shutil

        shutil.rmtree(self._dir, ignore_errors=True)
