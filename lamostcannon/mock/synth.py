r"""Physically motivated mock spectra: LAMOST (R ~ 1800) and GALAH line windows (R ~ 28,000).

Why a physical generator
------------------------
The Cannon is a quadratic polynomial in the labels. Mock spectra drawn from a polynomial would let
it fit its own assumptions and every test would look too good. These spectra instead come from a
(much simplified) line-formation recipe: an atomic line list, Saha-Boltzmann populations, a
continuous opacity, a curve of growth, pressure-broadened hydrogen lines, molecular bands, a
Planck continuum, interstellar reddening, an instrument with two arms, and photon, sky and read
noise.
The flux therefore depends on the labels in a strongly non-linear way (exponentials in 1/teff,
saturation, ionisation balance), as real spectra do.

The recipe, step by step
------------------------
Notation: :math:`\theta = 5040/T` (T the layer temperature of step 1); abundances
:math:`\log\epsilon_X = A_\odot(X) +
[{\rm Fe/H}] + [X/{\rm Fe}]` (Asplund et al. 2009 solar values; ``<x>_fe`` from the labels for the
11 GALAH elements, 0 for every other element, i.e. they scale with iron).

1. **Atmosphere in one layer.** Each star is represented by a single line-forming layer at
   ``T_layer = 0.9 teff`` (:data:`T_LAYER`; grey atmosphere near tau ~ 0.1, and the excitation
   temperature of solar Fe I), so :math:`\theta = 5040 / T_{\rm layer}`. Its electron pressure is
   an interpolation table in teff for the Sun's gravity (log Pe from -1.6 at 3000 K through 1.0
   at 5777 K to 3.6 at 15000 K) scaled by ``0.5 (logg - 4.44)`` (hydrostatic equilibrium with H-
   opacity) and, for cool stars where metals supply the electrons, ``+0.4 [Fe/H]``.
2. **Ionisation (Saha).** ``log(N_{i+1}/N_i) = -0.176 + log(U_{i+1}/U_i) + 2.5 log T - theta
   chi_ion - log Pe`` with constant representative partition functions U
   (:data:`lamostcannon.mock.linelist.PARTITION`), three stages per element; hydrogen alike.
3. **Excitation (Boltzmann).** The lower level population is ``g 10^(-theta chi) / U``.
4. **Continuous opacity** per hydrogen nucleus: H- (``Pe theta^2.5 10^(0.754 theta)``, the
   classic Gray (2005) scaling) plus hydrogen bound-free from n = 3 (``10^(-12.09 theta)``,
   normalised to equal H- at 7500 K, logg 4.44). Its wavelength dependence is ignored.
   With 1-4 the line strength of a majority-ionised species' neutral line is nearly
   gravity-independent, and its ionised lines strengthen at low gravity, as in real stars.
5. **Line centre optical depth** ``tau0 = K0 gf (lambda/5000 A) 10^(log eps - 12) f_stage
   10^(-theta chi) / U / kappa / (v_D / 2 km/s)``, with the Doppler velocity ``v_D^2 = 2kT/m +
   vmic^2``. The single constant ``K0`` makes Fe I 6151.62 A (chi = 2.18 eV, log gf = -3.30) have
   its solar equivalent width of 50 mA.
6. **Curve of growth.** ``W = Delta lambda_D F(tau0, a)`` with
   ``F = int (1 - exp(-tau0 H(a,x))) dx``
   tabulated once from the exact Voigt function ``H`` (``scipy.special.wofz``); linear for weak
   lines, ``~ sqrt(ln tau0)`` (so sensitive to vmic) when saturated, ``~ sqrt(a tau0)`` when damped.
   The damping parameter ``a = 0.015 damp (lambda/5000) (2 km/s / v_D) 10^(0.5 (logg - 4.44))
   (T/5777)^0.3`` models van der Waals broadening (``damp`` = 1 except for the strong lines, whose
   ``damp`` is calibrated on their solar equivalent widths).
7. **Hydrogen.** Balmer (H-alpha ... H16) and Paschen (P10-P16) lines scale with the n = 2 (10.2 eV)
   or n = 3 (12.09 eV) population of neutral hydrogen over the continuous opacity, times a Stark
   width ``(Pe / Pe_sun)^(2/3)``, raised to the power :data:`H_RESPONSE` = 0.37 (an empirical
   compression: the wings form over a wide range of depths; with it the H-alpha EW follows the
   observed spectral-type sequence, ~1 A at 4000 K, 4 A solar, ~11 A at 10,000 K). Their profile is
   the pure-wing profile ``1 - exp(-C / Delta lambda^2)`` (EW = 2 sqrt(pi C)) with a core depth
   limited to :data:`D_MAX_HYDROGEN`, calibrated on solar Balmer equivalent widths. Strength peaks
   near 10,000 K and wings are gravity-sensitive, as observed.
8. **Molecular bands** (CN, CH G band, MgH, TiO, CaH) are band heads with an exponential
   fall-off (to the red or violet) and a fixed pseudo-random rotational texture, with pseudo optical
   depth ``x = 10^(c + [A/H] + [B/H] + D (theta_eff - theta_ref) + beta (logg - 4.44))``
   (theta_eff = 5040/teff; a Saha-Boltzmann-like dissociation equilibrium; D ~ dissociation
   energy; MgH and CaH stronger in dwarfs, CN in giants, CH weaker in giants as after the first
   dredge-up) that saturates smoothly, ``cap (1 - exp(-x / cap))`` per molecule
   (:data:`BAND_SATURATION`). TiO appears below ~4000 K. The CN, CH and MgH strengths and
   temperature factors are calibrated on real DR10 K dwarfs and giants with even obsid
   (:data:`linelist.MOLECULAR_BANDS`).
   Ba II and Eu II lines carry an extra hyperfine/isotopic width (:data:`HYPERFINE`).
9. **Low resolution.** The line profiles are convolved with a Gaussian line-spread function of
   constant effective R = 1400 (:data:`LAMOST_R`; FWHM 3.1 px of the 1e-4 dex grid, plus the
   pixel width). LAMOST's nominal R is 1800, but a composite of real DR10 G dwarfs prefers the
   broader LSF. The intrinsic profiles (0.1 A) are far below this resolution, so a weak line is
   ``W x LSF``. Strong, damped lines (Ca II H&K, Ca triplet, Mg b, Na D, ...) use precomputed
   LSF-convolved damping profiles for a grid of widths (core depth limited to
   :data:`D_MAX_METAL`). All absorbers are combined as a low-resolution pseudo optical depth,
   ``flux = exp(-sum tau)``, which keeps blends positive and saturating.
10. **Observed frame.** The summed rest-frame optical depth is shifted by ``log10(1 + rv/c)`` (an
    exact translation on the log-lambda grid, done with an FFT phase shift after removing a linear
    trend). Interstellar Na I D and diffuse bands scale with ``ebv`` (:data:`ISM_BANDS`) and, like
    the residuals of the pipeline's telluric correction (O2 B and A, H2O; zero on average, DR10
    spectra are corrected), are added in the observed frame.
11. **Continuum.** A Planck function at teff, reddened with the Cardelli, Clayton & Mathis (1989)
    law (R_V = 3.1) for ``ebv``, times a random low-order tilt per spectrum.
12. **Instrument systematics** (:data:`SYSTEMATICS`, amplitudes measured on real even-obsid DR10
    spectra through :mod:`lamostcannon.realism`): per-arm LSF width changes (fibre-to-fibre
    resolution), multiplicative random ripples on ~2 and ~15 pixel scales (flat-field and
    flux-calibration residuals) that grow towards both ends and at the dichroic junction
    (5800-6200 A), unflagged detector defects at fixed columns, sky-subtraction residuals
    (a fraction of the sky lines and a sub-pixel wavelength mismatch), telluric-correction
    residuals, and a per-arm misestimate of the pipeline's variance. ``systematics=False``
    switches all of them off (the idealised instrument).
13. **Instrument and noise.** Counts = flux x throughput (blue arm peaking near 5000 A, red arm
    near 7800 A, dichroic crossover at 5800-5950 A, times an empirical correction that gives the
    S/N-per-pixel profile of real DR10 spectra, :data:`THROUGHPUT_CORRECTION`), plus sky (a
    smooth continuum and the emission lines measured from the variance of real DR10 spectra,
    :func:`lamostcannon.mock.linelist.build_sky_lines`) and read noise. The exposure is set so
    that the median g-band S/N of the reported variance equals ``snrg``; other bands follow from
    the SED, the throughput and the sky. Gaussian noise with the variance of counts + sky + read
    noise; ``ivar`` is the pipeline's (misestimated) inverse variance in flux units.
14. **Bad pixels.** Bad-column runs of 2-9 pixels and isolated dead pixels (``andmask`` bit 1,
    ``ivar = 0``, flux sometimes 0), occasional dead red ends (bit 8), cosmic-ray-like spikes
    (``ormask`` bit 2 only; ivar kept), sky pixels 30 times brighter than the star (``ormask``
    bit 4; real DR10 files flag almost none).

The line list (:mod:`lamostcannon.mock.linelist`): real wavelengths and approximate atomic data
for the strong and well-known lines, one line per GALAH Table 2 window, and a weak-line forest whose
positions and solar-type strengths come from a CLEAN decomposition of a composite of real DR10
G-dwarf spectra, with species and excitation potentials chosen to follow composites of K dwarfs,
K giants and F dwarfs (even obsids only; the odd ones are held out for the realism tests);
everything else (how each line changes with teff, logg, vmic and abundances) is the physics above.

GALAH windows: the same line physics (steps 1-7, hydrogen wings included, molecules and the
empirical low-resolution blends omitted) at R = 28,000, computed at high resolution
(``exp(-tau)`` with a Voigt approximation
``H ~ exp(-x^2) + a / (sqrt(pi) (1 + x^2))`` on a grid three times finer than the pixels, then a
Gaussian LSF), continuum-normalised, air wavelengths, only in the paper's Table 2 windows.

Approximations (deliberate; this is a mock, not a model atmosphere)
-------------------------------------------------------------------
One layer instead of an atmosphere (no temperature gradient; no source function, except the
core-depth limits of damped lines at low resolution: other lines saturate to zero flux at high
resolution); partition functions constant; LTE; continuous opacity without
wavelength dependence and without metals or scattering; pure-wing hydrogen profiles (Lorentzian
1/Delta lambda^2 rather than Holtsmark); no rotation or macroturbulence; the weak-line forest is
made of low-resolution blends at empirical wavelengths whose species and excitation potentials
are chosen to follow four composites of real stars (G and K dwarfs, K giants, F dwarfs), one
species per blend (pseudo-random outside 3800-9000 A and in masked regions, see
:mod:`lamostcannon.mock.linelist`); the strong lines of K dwarfs come out too weak (a model
trained on real spectra reads mock K dwarfs ~250 K hotter and 0.4 dex lower in logg, notebook 01);
constant mean resolving power (per-fibre changes only as
random systematics); the instrument systematics are random fields with measured amplitudes, not a
model of the LAMOST pipeline. The rv shift is non-relativistic (``z = rv/c``), as in the LAMOST
pipeline.

Results depend on the chunking of the input (random draws happen chunk by chunk): the same
stars, the same seed and the same ``chunk_size`` give identical arrays.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

from ..labels import ELEMENTS

log = logging.getLogger(__name__)

#: The LAMOST pixel grid of the files: log10(lambda / A) = START + STEP * i, i = 0..NPIX-1 (vacuum).
LAMOST_LOG10_START = 3.5682
LAMOST_LOG10_STEP = 1e-4
LAMOST_NPIX = 3909

#: Resolving powers. LAMOST's nominal R is 1800 (at 5500 A); a composite of real DR10 G-dwarf
#: spectra is matched best (rms of the normalised flux) by a Gaussian LSF of R ~ 1300-1500 in the
#: blue arm and ~1100 in the red arm, so the mock adopts the effective value 1400 everywhere.
LAMOST_R_NOMINAL = 1800.0
LAMOST_R = 1400.0
GALAH_R = 28000.0

C_KMS = 299792.458
_LN10 = np.log(10.0)
_AMU_KMS2 = 2 * 1.380649e-23 / 1.66053907e-27 / 1e6  # 2k/amu in (km/s)^2 per K

#: The Sun as the mock sees it (calibration point).
SUN = {"teff": 5777.0, "logg": 4.44, "vmic": 1.0, "fe_h": 0.0}

#: Band edges (observed vacuum A) over which snru..snrz are measured (median S/N per pixel).
SNR_BANDS = {"u": (3700.0, 4000.0), "g": (4000.0, 5500.0), "r": (5600.0, 6900.0),
             "i": (6900.0, 8400.0), "z": (8400.0, 9100.0)}

#: Mask bits used by the mock (``andmask``/``ormask``).
MASK_BITS = {"BADPIX": 1, "COSMIC": 2, "BRIGHTSKY": 4, "NODATA": 8}

_PAD = 150                         # rest-frame grid margin (pixels) on each side: |rv| < 5000 km/s
_NEXT = LAMOST_NPIX + 2 * _PAD     # extended rest-frame grid length
_SIGMA_LSF_PIX = float(np.sqrt((1.0 / (LAMOST_R * 2.0 * np.sqrt(2 * np.log(2)) * _LN10
                                       * LAMOST_LOG10_STEP)) ** 2 + 1.0 / 12.0))
_BANK_W = np.concatenate([[0.0], np.geomspace(0.12, 60.0, 28)])   # damping widths, pixels
_BANK_HALF = 420                   # half-extent of damped profiles (pixels)
_BANK_SUB = 8                      # sub-pixel sampling of the profile bank
_REQUIRED = (("teff", "logg", "vmic", "fe_h", "rv", "ebv", "snrg")
             + tuple(f"{x}_fe" for x in ELEMENTS))


def lamost_wavelength() -> np.ndarray:
    """The LAMOST observed-frame vacuum wavelength grid, shape (3909,), Angstrom."""
    return 10.0 ** (LAMOST_LOG10_START + LAMOST_LOG10_STEP * np.arange(LAMOST_NPIX))


def _extended_wavelength() -> np.ndarray:
    """The rest-frame synthesis grid: the LAMOST grid with ``_PAD`` pixels on each side."""
    return 10.0 ** (LAMOST_LOG10_START + LAMOST_LOG10_STEP * (np.arange(_NEXT) - _PAD))


# ------------------------------------------------------------------------------------------------
# Physics of one layer
# ------------------------------------------------------------------------------------------------

_PE_T = np.array([2500, 3000, 3500, 4000, 4500, 5000, 5500, 5777, 6000, 6500, 7000, 7500, 8000,
                  9000, 10000, 12000, 15000, 20000, 30000], float)
_PE_LOG = np.array([-2.1, -1.6, -1.0, -0.45, 0.05, 0.45, 0.82, 1.0, 1.2, 1.65, 2.1, 2.5, 2.8, 3.1,
                    3.3, 3.5, 3.6, 3.7, 3.8])


def log_electron_pressure(teff, logg, fe_h):
    """log10 electron pressure (dyn cm^-2) of the line-forming layer (step 1 of the recipe)."""
    teff = np.asarray(teff, float)
    metal_weight = np.clip((7000.0 - teff) / 1500.0, 0.0, 1.0)
    return (np.interp(teff, _PE_T, _PE_LOG) + 0.5 * (np.asarray(logg) - 4.44)
            + 0.4 * metal_weight * np.asarray(fe_h))


def _log_saha(teff, chi_ion, log_pe, log_u_ratio=0.0):
    """log10(N_{i+1}/N_i) (Saha, pressure form; ``log_u_ratio`` = log10 U_{i+1}/U_i)."""
    return -0.1762 + log_u_ratio + 2.5 * np.log10(teff) - 5040.0 / teff * chi_ion - log_pe


def stage_log_fractions(teff, log_pe, chi1, chi2, u=(1.0, 1.0, 1.0)):
    """log10 of the fractions of an element in stages I, II, III, each shape of ``teff``.

    ``chi1, chi2`` are the ionisation potentials (eV), ``u`` the partition functions.
    """
    r1 = _log_saha(teff, chi1, log_pe, np.log10(u[1] / u[0]))
    r2 = r1 + _log_saha(teff, chi2, log_pe, np.log10(u[2] / u[1]))
    top = np.maximum(np.maximum(0.0, r1), r2)
    log_sum = top + np.log10(10 ** (-top) + 10 ** (r1 - top) + 10 ** (r2 - top))
    return -log_sum, r1 - log_sum, r2 - log_sum


@functools.lru_cache(maxsize=1)
def _hbf_norm():
    """Normalisation of hydrogen bound-free opacity: equal to H- at 7500 K, logg 4.44."""
    theta = 5040.0 / (T_LAYER * 7500.0)
    log_pe = float(log_electron_pressure(7500.0, 4.44, 0.0))
    return log_pe + 2.5 * np.log10(theta) + 0.754 * theta + 12.09 * theta


#: Temperature of the line-forming layer relative to teff (Eddington grey atmosphere at tau ~ 0.1;
#: also the excitation temperature found from solar Fe I curves of growth).
T_LAYER = 0.9


def atmosphere(teff, logg, fe_h) -> dict:
    """Per-star quantities of the one-layer atmosphere (steps 1, 2 and 4).

    Returns a dict of arrays: ``theta``, ``log_pe``, ``log_kappa`` (log10 continuous opacity per
    H nucleus, arbitrary zero point), ``log_fh0`` (log10 neutral hydrogen fraction), ``t_layer``
    (K, the layer temperature ``T_LAYER * teff`` used in the Saha and Boltzmann factors).
    """
    teff = np.asarray(teff, float)
    t_layer = T_LAYER * teff
    theta = 5040.0 / t_layer
    log_pe = log_electron_pressure(teff, logg, fe_h)
    log_fh0 = -np.logaddexp(0.0, _LN10 * _log_saha(t_layer, 13.6, log_pe, np.log10(0.5))) / _LN10
    log_hm = log_pe + 2.5 * np.log10(theta) + 0.754 * theta
    log_hbf = _hbf_norm() - 12.09 * theta
    log_kappa = log_fh0 + np.logaddexp(_LN10 * log_hm, _LN10 * log_hbf) / _LN10
    return {"theta": theta, "t_layer": t_layer, "log_pe": log_pe, "log_kappa": log_kappa,
            "log_fh0": log_fh0}


# ------------------------------------------------------------------------------------------------
# Curve of growth
# ------------------------------------------------------------------------------------------------

_COG_DLT = 0.05
_COG_DLA = 0.1
_COG_LT = np.arange(-6.0, 11.0001, _COG_DLT)
_COG_LA = np.arange(-4.0, 1.0001, _COG_DLA)


@functools.lru_cache(maxsize=1)
def _cog_table() -> np.ndarray:
    """F(log tau0, log a) = int (1 - exp(-tau0 H(a, x))) dx over all x (Doppler units)."""
    from scipy.special import wofz

    x = np.concatenate([np.linspace(0.0, 6.0, 481)[:-1], np.geomspace(6.0, 3e6, 1400)])
    table = np.empty((_COG_LT.size, _COG_LA.size))
    for j, la in enumerate(_COG_LA):
        a = 10.0 ** la
        h = wofz(x + 1j * a).real
        tau = 10.0 ** _COG_LT[:, None] * h[None, :]
        integrand = -np.expm1(-tau)
        integral = np.sum(0.5 * (integrand[:, 1:] + integrand[:, :-1]) * np.diff(x), axis=1)
        tail = 10.0 ** _COG_LT * a / (np.sqrt(np.pi) * x[-1])  # optically thin beyond x_max
        table[:, j] = 2.0 * (integral + tail)
    return table


@functools.lru_cache(maxsize=1)
def _cog_flat():
    """The table transposed and flattened (a-major) with its forward differences, float32."""
    t = _cog_table().T.astype(np.float32)          # (n_a, n_tau)
    d = np.diff(t, axis=1, append=t[:, -1:])
    return t.ravel(), d.ravel()


def reduced_width(log_tau0, log_a):
    """Curve of growth W / Delta lambda_D for arrays of log10 tau0 and log10 a.

    Linear interpolation in log tau0 (step 0.05) at the nearest tabulated log a (step 0.1, which
    changes W by < 0.6% in the damping regime); ``sqrt(pi) tau0`` below the table.
    """
    flat, diff = _cog_flat()
    lt = np.asarray(log_tau0, dtype=np.float32)
    la = np.asarray(log_a, dtype=np.float32)
    n_tau = _COG_LT.size
    u = (lt - np.float32(_COG_LT[0])) * np.float32(1.0 / _COG_DLT)
    np.clip(u, 0.0, n_tau - 1.0, out=u)
    i = u.astype(np.int32)
    du = u - i
    j = ((la - np.float32(_COG_LA[0])) * np.float32(1.0 / _COG_DLA) + np.float32(0.5))
    np.clip(j, 0.0, _COG_LA.size - 1.0, out=j)
    idx = j.astype(np.int32) * n_tau + i
    f = np.take(flat, idx) + du * np.take(diff, idx)
    weak = lt < _COG_LT[0]
    if weak.any():
        f = np.where(weak, np.float32(np.sqrt(np.pi)) * np.power(np.float32(10.0), lt), f)
    return f


def _log_tau0_from_reduced_width(reduced, log_a):
    """Invert the curve of growth for each line (nearest tabulated a)."""
    table = _cog_table()
    j = np.clip(np.rint((np.asarray(log_a) - _COG_LA[0]) / _COG_DLA).astype(int), 0,
                _COG_LA.size - 1)
    out = np.empty(np.shape(reduced))
    for jj in np.unique(j):
        sel = j == jj
        out[sel] = np.interp(np.log10(reduced[sel]), np.log10(table[:, jj]), _COG_LT)
    return out


# ------------------------------------------------------------------------------------------------
# Line data prepared for synthesis
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Lines:
    wave_vac: np.ndarray
    wave_air: np.ndarray
    chi: np.ndarray
    base: np.ndarray         # log gf + log10(lambda/5000) + K0
    damp: np.ndarray
    species: np.ndarray      # index into species_list
    wide: np.ndarray
    species_list: tuple      # (element, stage)
    galah: np.ndarray        # used at high resolution (not an empirical low-resolution blend)


def _label_columns(stars) -> dict:
    """Validated float arrays of the needed columns of a DataFrame (or mapping of arrays)."""
    missing = [c for c in _REQUIRED if c not in stars]
    if missing:
        raise ValueError(f"stars is missing columns {missing}; expected columns {list(_REQUIRED)}")
    out = {c: np.asarray(stars[c], dtype=float) for c in _REQUIRED}
    n = out["teff"].shape[0]
    for c, v in out.items():
        if v.shape != (n,):
            raise ValueError(f"column {c} has shape {v.shape}; expected ({n},)")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"column {c} has NaN or inf values")
    if np.any(out["teff"] < 2500) or np.any(out["teff"] > 30000):
        raise ValueError("teff must lie in 2500-30000 K")
    return out


def _log_eps(element: str, lab: dict) -> np.ndarray:
    from .linelist import SOLAR_ABUNDANCE

    x = element.lower()
    val = SOLAR_ABUNDANCE[element] + lab["fe_h"]
    if x in ELEMENTS:
        val = val + lab[f"{x}_fe"]
    return val


#: Hyperfine and isotopic splitting as an extra Gaussian velocity width (km/s) per species
#: (element, stage): the split components of Ba II (odd isotopes 135, 137) and Eu II (151, 153)
#: spread each line over ~0.05-0.1 A, so that their strong lines are less saturated than a single
#: component of the same equivalent width would be, and keep their sensitivity to the abundance
#: in giants (Ba II 4554, 4934, 5853, 6141, 6496 A; Eu II 4129, 4205, 6645 A).
HYPERFINE = {("Ba", 2): 5.0, ("Eu", 2): 4.0}


def _species_terms(species_list, lab: dict, atm: dict, hyperfine: bool = True):
    """Per star and species: log10(eps f_stage / kappa / (v_D/2)) - 12 and v_D (km/s).

    ``hyperfine`` adds the :data:`HYPERFINE` widths (the low-resolution curve of growth; the
    R = 28,000 GALAH windows resolve the lines and leave them out)."""
    from .linelist import ATOMIC_MASS, IONISATION, PARTITION

    n = lab["teff"].shape[0]
    terms = np.empty((n, len(species_list)))
    vdop = np.empty((n, len(species_list)))
    cache = {}
    for k, (element, stage) in enumerate(species_list):
        if element not in cache:
            chi1, chi2 = IONISATION[element]
            cache[element] = stage_log_fractions(atm["t_layer"], atm["log_pe"], chi1, chi2,
                                                 PARTITION[element])
        vd = np.sqrt(_AMU_KMS2 * lab["teff"] / ATOMIC_MASS[element] + lab["vmic"] ** 2
                     + (HYPERFINE.get((element, stage), 0.0) if hyperfine else 0.0) ** 2)
        vdop[:, k] = vd
        terms[:, k] = (_log_eps(element, lab) - 12.0 + cache[element][stage - 1]
                       - np.log10(PARTITION[element][stage - 1]) - atm["log_kappa"]
                       - np.log10(vd / 2.0))
    return terms, vdop


def _sun_labels(n: int = 1) -> dict:
    lab = {k: np.full(n, v) for k, v in SUN.items()}
    for x in ELEMENTS:
        lab[f"{x}_fe"] = np.zeros(n)
    return lab


def _line_quantities(lines_wave, chi, base, damp, species_idx, species_list, lab,
                     hyperfine: bool = True):
    """log tau0, log a and Doppler width (A) for every star x line, float32 (S, N) each."""
    f32 = np.float32
    atm = atmosphere(lab["teff"], lab["logg"], lab["fe_h"])
    terms, vdop = _species_terms(species_list, lab, atm, hyperfine)
    log_vd = np.log10(vdop / 2.0).astype(f32)
    log_tau0 = np.take(terms.astype(f32), species_idx, axis=1)
    log_tau0 += np.asarray(base, f32)[None, :]
    log_tau0 -= atm["theta"].astype(f32)[:, None] * np.asarray(chi, f32)[None, :]
    star = (np.log10(0.015) + 0.5 * (lab["logg"] - 4.44)
            + 0.3 * np.log10(lab["teff"] / 5777.0)).astype(f32)
    line = (np.log10(damp) + np.log10(np.asarray(lines_wave) / 5000.0)).astype(f32)
    lvd = np.take(log_vd, species_idx, axis=1)
    log_a = star[:, None] + line[None, :] - lvd
    dlam = np.power(f32(10.0), lvd) * (2.0 * np.asarray(lines_wave) / C_KMS).astype(f32)[None, :]
    return log_tau0, log_a, dlam


#: Calibration line for K0: Fe I 6151.62 A, chi 2.18 eV, log gf -3.30, solar EW 50 mA.
_K0_LINE = (6151.62, 2.18, -3.30, 0.050)


@functools.lru_cache(maxsize=1)
def _k0() -> float:
    wave, chi, loggf, ew = _K0_LINE
    sl = (("Fe", 1),)
    lab = _sun_labels()
    lt, la, dl = _line_quantities(np.array([wave]), np.array([chi]),
                                  np.array([loggf + np.log10(wave / 5000.0)]), np.array([1.0]),
                                  np.array([0]), sl, lab)
    target = _log_tau0_from_reduced_width(np.array([ew / dl[0, 0]]), la[0])
    return float(target[0] - lt[0, 0])


def solar_ew(table, damp=None) -> np.ndarray:
    """Equivalent widths (A) in the mock Sun of lines (DataFrame: species, wave_air, chi, loggf)."""
    from .linelist import split_species

    species = [split_species(s) for s in table["species"]]
    species_list = tuple(sorted(set(species)))
    idx = np.array([species_list.index(s) for s in species])
    wave = np.asarray(table["wave_air"], float)
    damp = np.ones(wave.size) if damp is None else np.asarray(damp, float)
    base = np.asarray(table["loggf"], float) + np.log10(wave / 5000.0) + _k0()
    lt, la, dl = _line_quantities(wave, np.asarray(table["chi"], float), base, damp, idx,
                                  species_list, _sun_labels())
    return (dl * reduced_width(lt, la))[0].astype(float)


def solve_loggf_for_solar_ew(table, labels: dict | None = None) -> np.ndarray:
    """log gf giving each line (with ``target_ew``, A) that equivalent width in the mock Sun
    (or in the star with ``labels``: teff, logg, vmic, fe_h; solar-scaled abundances)."""
    from .linelist import split_species

    species = [split_species(s) for s in table["species"]]
    species_list = tuple(sorted(set(species)))
    idx = np.array([species_list.index(s) for s in species])
    wave = np.asarray(table["wave_air"], float)
    base0 = np.log10(wave / 5000.0) + _k0()
    lab = _sun_labels()
    if labels is not None:
        lab.update({k: np.full(1, float(v)) for k, v in labels.items()})
    lt, la, dl = _line_quantities(wave, np.asarray(table["chi"], float), base0, np.ones(wave.size),
                                  idx, species_list, lab)
    need = _log_tau0_from_reduced_width(np.asarray(table["target_ew"], float) / dl[0], la[0])
    return need - lt[0]


def _solve_damp(wave, chi, loggf, species, ew_sun) -> np.ndarray:
    """Damping enhancement giving the damped calibrator lines their solar equivalent widths."""
    import pandas as pd

    table = pd.DataFrame({"species": species, "wave_air": wave, "chi": chi, "loggf": loggf})
    lo = np.full(len(wave), -1.0)
    hi = np.full(len(wave), 3.5)
    for _ in range(40):  # bisection in log10 damp
        mid = 0.5 * (lo + hi)
        ew = solar_ew(table, damp=10 ** mid)
        too_big = ew > ew_sun
        hi = np.where(too_big, mid, hi)
        lo = np.where(too_big, lo, mid)
    return 10 ** (0.5 * (lo + hi))


@functools.lru_cache(maxsize=1)
def _default_model() -> dict:
    """The packaged line list prepared for synthesis (cached)."""
    from .linelist import load_linelist

    return _prepare_model(load_linelist())


def _prepare_model(table) -> dict:
    """Line data, the narrow-line LSF basis and the damped-line profiles for a line table."""
    lines = _prepare_lines(table)
    return {"lines": lines, "narrow": _make_narrow_basis(lines), "wide": _make_wide_setup(lines)}


def _lines() -> _Lines:
    return _default_model()["lines"]


def _prepare_lines(t) -> _Lines:
    from .linelist import split_species

    species = [split_species(s) for s in t["species"]]
    species_list = tuple(sorted(set(species)))
    idx = np.array([species_list.index(s) for s in species])
    damp = np.ones(len(t))
    cal = np.isfinite(t["ew_sun"].to_numpy())
    if cal.any():
        damp[cal] = _solve_damp(t.wave_air[cal].to_numpy(), t.chi[cal].to_numpy(),
                                t.loggf[cal].to_numpy(), t.species[cal].to_numpy(),
                                t.ew_sun[cal].to_numpy())
    wave_air = t["wave_air"].to_numpy(float)
    return _Lines(wave_vac=t["wave_vac"].to_numpy(float), wave_air=wave_air,
                  chi=t["chi"].to_numpy(float),
                  base=t["loggf"].to_numpy(float) + np.log10(wave_air / 5000.0) + _k0(),
                  damp=damp, species=idx, wide=t["wide"].to_numpy(bool),
                  species_list=species_list,
                  galah=(t["source"] != "empirical").to_numpy(bool) if "source" in t
                  else np.ones(len(t), bool))


# ------------------------------------------------------------------------------------------------
# Hydrogen
# ------------------------------------------------------------------------------------------------

#: Solar Balmer equivalent widths (A) used to calibrate the hydrogen line strengths.
_H_EW_SUN = {"H-alpha": 4.0, "H-beta": 3.2, "H-gamma": 2.9, "H-delta": 2.2, "H-epsilon": 2.0,
             "H8": 1.6, "H9": 1.3, "H10": 1.05, "H11": 0.85, "H12": 0.7, "H13": 0.6, "H14": 0.5,
             "H15": 0.42, "H16": 0.36}


def _hydrogen_log_strength(lab: dict, n_low: np.ndarray) -> np.ndarray:
    """log10 of the hydrogen wing parameter relative to the Sun, per star x line (step 7)."""
    atm = atmosphere(lab["teff"], lab["logg"], lab["fe_h"])
    chi = np.where(n_low == 2, 10.2, 12.09)
    logg_stat = np.log10(2.0 * n_low ** 2)
    val = (atm["log_fh0"][:, None] + logg_stat[None, :] - atm["theta"][:, None] * chi[None, :]
           - atm["log_kappa"][:, None] + (2.0 / 3.0) * atm["log_pe"][:, None])
    return val


@functools.lru_cache(maxsize=1)
def _hydrogen() -> dict:
    from .linelist import HYDROGEN_LINES, air_to_vacuum

    names = [h[0] for h in HYDROGEN_LINES]
    wave_air = np.array([h[1] for h in HYDROGEN_LINES])
    n_low = np.array([h[2] for h in HYDROGEN_LINES])
    n_up = np.array([h[3] for h in HYDROGEN_LINES])
    f = np.array([h[4] for h in HYDROGEN_LINES])
    sun = _hydrogen_log_strength(_sun_labels(), n_low)[0]
    # wing parameter C (A^2) in the Sun: from the solar EW (Balmer) or scaled from H-alpha (Paschen)
    c_alpha = (4.0 / 2.0) ** 2 / np.pi
    log_c_sun = np.empty(len(names))
    for k, name in enumerate(names):
        if name in _H_EW_SUN:
            log_c_sun[k] = np.log10((_H_EW_SUN[name] / 2.0) ** 2 / np.pi)
        else:
            scale = (f[k] / f[0]) * (wave_air[k] / wave_air[0]) ** 4 * (n_up[k] ** 2 - 9) / 5.0
            log_c_sun[k] = (np.log10(c_alpha * scale) + H_RESPONSE * (sun[k] - sun[0])
                            + PASCHEN_OFFSET)
    return {"names": names, "wave_air": wave_air, "wave_vac": air_to_vacuum(wave_air),
            "n_low": n_low, "log_c_sun": log_c_sun, "log_sun": sun}


#: Hydrogen lines respond to the one-layer opacity ratio as this power of it (an empirical
#: compression: the Balmer wings form over a wide range of depths). With it the mock H-alpha EW runs
#: ~1 A (4000 K), 2 A (5000 K), 4 A (Sun), 6 A (6500 K), 11 A (9000-10000 K) for dwarfs, close to
#: the observed spectral-type sequence.
H_RESPONSE = 0.37

#: Extra weakening (dex) of the Paschen lines relative to the n = 3 population scaling.
PASCHEN_OFFSET = -1.2


def hydrogen_wing_parameter(lab: dict) -> np.ndarray:
    """Wing parameter C (A^2) of every hydrogen line, shape (S, n_H); EW = 2 sqrt(pi C).

    ``lab``: a DataFrame or mapping with ``teff``, ``logg``, ``fe_h``. Line order of
    :data:`lamostcannon.mock.linelist.HYDROGEN_LINES`.
    """
    lab = {k: np.atleast_1d(np.asarray(lab[k], float)) for k in ("teff", "logg", "fe_h")}
    h = _hydrogen()
    rel = _hydrogen_log_strength(lab, h["n_low"]) - h["log_sun"][None, :]
    return 10.0 ** (H_RESPONSE * rel + h["log_c_sun"][None, :])


# ------------------------------------------------------------------------------------------------
# Low-resolution bases (cached): narrow-line LSF matrix, damped-profile banks, molecular bands
# ------------------------------------------------------------------------------------------------

#: Largest intrinsic depth of damped metal lines and of hydrogen lines (a one-layer stand-in for
#: the source function: real strong-line cores keep some flux).
D_MAX_METAL = 0.92
D_MAX_HYDROGEN = 0.62


@functools.lru_cache(maxsize=2)
def _profile_bank(d_max: float = 1.0) -> np.ndarray:
    """Pseudo optical depth per unit EW (pixel units) of LSF x d_max (1 - exp(-w^2/x^2)), by w.

    Shape (len(_BANK_W), 2 * _BANK_HALF * _BANK_SUB + 1), sampled every 1/_BANK_SUB pixel; the
    EW of row k is ``2 sqrt(pi) d_max w_k``. Row 0 (w = 0) is the Gaussian LSF itself (a weak line).
    """
    h = 1.0 / 64.0
    n = 2 * 2048 * 64  # fine grid of +-2048 px
    y = (np.arange(n) - n // 2) * h
    freq = np.fft.rfftfreq(n, d=h)
    transfer = np.exp(-2.0 * (np.pi * freq * _SIGMA_LSF_PIX) ** 2)
    sub = 64 // _BANK_SUB
    keep = slice(n // 2 - _BANK_HALF * 64, n // 2 + _BANK_HALF * 64 + 1, sub)
    ysub = y[keep]
    bank = np.empty((_BANK_W.size, ysub.size))
    bank[0] = np.exp(-0.5 * (ysub / _SIGMA_LSF_PIX) ** 2) / (np.sqrt(2 * np.pi) * _SIGMA_LSF_PIX)
    with np.errstate(divide="ignore"):
        inv_y2 = np.where(y == 0, np.inf, 1.0 / np.where(y == 0, 1.0, y) ** 2)
    for k, w in enumerate(_BANK_W[1:], start=1):
        depth = -d_max * np.expm1(-(w ** 2) * inv_y2)
        conv = np.fft.irfft(np.fft.rfft(depth) * transfer, n)
        conv = np.clip(conv[keep], 0.0, 1.0 - 1e-7)
        bank[k] = -np.log1p(-conv) / (2.0 * np.sqrt(np.pi) * d_max * w)
    return bank.astype(np.float32)


def _pixel_width(wave):
    """Pixel width (A) at vacuum wavelength ``wave`` on the 1e-4 dex grid."""
    return wave * _LN10 * LAMOST_LOG10_STEP


def _pixel_position(wave_vac):
    """Fractional pixel index of a rest wavelength on the extended grid."""
    return (np.log10(wave_vac) - LAMOST_LOG10_START) / LAMOST_LOG10_STEP + _PAD


def _make_narrow_basis(lines: _Lines):
    """Sparse (N_lines, _NEXT) LSF basis for all lines: pseudo-tau per unit EW in pixel units."""
    from scipy import sparse

    pos = _pixel_position(lines.wave_vac)
    half = 7
    rows, cols, vals = [], [], []
    centre = np.rint(pos).astype(int)
    for d in range(-half, half + 1):
        col = centre + d
        off = col - pos
        val = np.exp(-0.5 * (off / _SIGMA_LSF_PIX) ** 2) / (np.sqrt(2 * np.pi) * _SIGMA_LSF_PIX)
        ok = (col >= 0) & (col < _NEXT)
        rows.append(np.nonzero(ok)[0])
        cols.append(col[ok])
        vals.append(val[ok])
    mat = sparse.csr_matrix((np.concatenate(vals).astype(np.float32),
                             (np.concatenate(rows), np.concatenate(cols))),
                            shape=(pos.size, _NEXT))
    return mat


_WIDE_HALF = {"metal": 160, "hydrogen": 260}   # extent (pixels) of damped profiles on each side


def _bank_slices(wave_vac, half):
    """For damped lines: first extended-grid column and bank sub-sample indices (n, 2 half + 1)."""
    pos = _pixel_position(np.atleast_1d(wave_vac))
    centre = np.rint(pos).astype(int)
    cols = centre[:, None] + np.arange(-half, half + 1)[None, :]
    sub = np.rint((cols - pos[:, None]) * _BANK_SUB).astype(int) + _BANK_HALF * _BANK_SUB
    return cols, sub


def _make_wide_setup(lines: _Lines):
    """Damped metal and hydrogen lines: per line the grid slice and profiles (n_w, length)."""
    out = {}
    for name, waves, d_max in (("metal", lines.wave_vac[lines.wide], D_MAX_METAL),
                               ("hydrogen", _hydrogen()["wave_vac"], D_MAX_HYDROGEN)):
        bank = _profile_bank(d_max)
        cols, sub = _bank_slices(waves, _WIDE_HALF[name])
        entries = []
        for c, sb in zip(cols, sub):
            ok = (c >= 0) & (c < _NEXT)
            if not ok.any():
                entries.append((0, 0, np.zeros((_BANK_W.size, 0), np.float32)))
                continue
            c0, c1 = int(c[ok][0]), int(c[ok][-1]) + 1
            entries.append((c0, c1, np.ascontiguousarray(bank[:, sb[ok]], dtype=np.float32)))
        out[name] = (entries, d_max)
    return out


def _apply_wide(tau, ew_pix, entries, d_max):
    """Add damped-line pseudo optical depth to ``tau`` (S, _NEXT) given EW in pixels (S, n)."""
    w = ew_pix / (2.0 * np.sqrt(np.pi) * d_max)
    u = np.interp(np.log(np.maximum(w, 1e-6)), np.log(_BANK_W[1:]), np.arange(1, _BANK_W.size))
    # below the first nonzero width: interpolate linearly in w towards the LSF (row 0)
    u = np.where(w < _BANK_W[1], w / _BANK_W[1], u)
    k = np.clip(np.floor(u).astype(int), 0, _BANK_W.size - 2)
    t = u - k
    rows = np.arange(tau.shape[0])
    weights = np.zeros((tau.shape[0], _BANK_W.size), np.float32)
    for j, (c0, c1, prof) in enumerate(entries):
        if c1 <= c0:
            continue
        weights[:] = 0.0
        weights[rows, k[:, j]] = (1.0 - t[:, j]) * ew_pix[:, j]
        weights[rows, k[:, j] + 1] += t[:, j] * ew_pix[:, j]
        tau[:, c0:c1] += weights @ prof


def _texture(wave, seed):
    """Fixed pseudo-random rotational structure for a molecular band (mean 1)."""
    rng = np.random.default_rng(seed)
    step = 0.25
    fine = np.arange(wave.min() - 5, wave.max() + 5, step)
    noise = rng.standard_normal(fine.size)
    ker = np.exp(-0.5 * (np.arange(-12, 13) * step / 0.8) ** 2)
    sm = np.convolve(noise, ker / ker.sum(), mode="same")
    sm = sm / sm.std()
    return np.interp(wave, fine, np.clip(1.0 + 0.45 * sm, 0.1, None))


@functools.lru_cache(maxsize=1)
def _band_shapes():
    """LSF-convolved molecular band shapes on the extended rest grid, (n_bands, _NEXT)."""
    from .linelist import MOLECULAR_BANDS, air_to_vacuum

    wave = _extended_wavelength()
    shapes = np.zeros((len(MOLECULAR_BANDS), _NEXT))
    ker_x = np.arange(-6, 7)
    ker = np.exp(-0.5 * (ker_x / _SIGMA_LSF_PIX) ** 2)
    ker /= ker.sum()
    for b, (name, mol, elems, head, direction, length, *_rest) in enumerate(MOLECULAR_BANDS):
        head_v = float(air_to_vacuum(head))
        d = (wave - head_v) * direction
        s = np.where(d >= 0, np.exp(-np.maximum(d, 0) / length), 0.0)
        s *= _texture(wave, 1000 + b)
        shapes[b] = np.convolve(s, ker, mode="same")
    return shapes.astype(np.float32)


def _band_tau(lab: dict) -> np.ndarray:
    """Pseudo optical depth amplitudes of the molecular bands, (S, n_bands)."""
    from .linelist import MOLECULAR_BANDS, SOLAR_ABUNDANCE

    theta = 5040.0 / lab["teff"]
    out = np.empty((lab["teff"].size, len(MOLECULAR_BANDS)))
    for b, (name, mol, elems, head, direction, length, c, dis, th_ref, beta) in enumerate(
            MOLECULAR_BANDS):
        ab = sum(_log_eps(e, lab) - SOLAR_ABUNDANCE[e] for e in elems)
        log_tau = c + ab + dis * (theta - th_ref) + beta * (lab["logg"] - 4.44)
        x = 10.0 ** np.clip(log_tau, -8.0, 3.0)
        cap = BAND_SATURATION[mol]   # the band's many lines saturate: depth levels off smoothly
        out[:, b] = cap * -np.expm1(-x / cap)
    return out


#: Largest pseudo optical depth (before the rotational texture) of each molecule's bands at low
#: resolution: ``tau = cap (1 - exp(-x / cap))`` for the Saha-Boltzmann-like strength ``x``. A
#: band is a forest of lines that saturate one by one, so its mean depth levels off (MgH reaches
#: ~30% in K7-M0 dwarfs at R ~ 1800, TiO much more in M dwarfs); without the cap the depth grows
#: as a double exponential of 1/teff.
BAND_SATURATION = {"MgH": 0.35, "CaH": 0.5, "CN": 0.6, "CH": 0.8, "TiO": 2.5}


# ------------------------------------------------------------------------------------------------
# Continuum, extinction, instrument, sky, tellurics
# ------------------------------------------------------------------------------------------------

def planck(wave, teff):
    """Planck B_lambda (arbitrary units) for wave (P,) A and teff (S,) -> (S, P)."""
    hc_k = 1.438777e8  # A K
    x = hc_k / (np.asarray(wave)[None, :] * np.asarray(teff)[:, None])
    return (np.asarray(wave)[None, :] / 5000.0) ** -5 / np.expm1(np.minimum(x, 700.0))


def ccm_extinction(wave, r_v: float = 3.1):
    """A_lambda / E(B-V) of Cardelli, Clayton & Mathis (1989), wave in A (optical and near-IR)."""
    x = 1e4 / np.asarray(wave, float)
    a = np.empty_like(x)
    b = np.empty_like(x)
    ir = x < 1.1
    a[ir] = 0.574 * x[ir] ** 1.61
    b[ir] = -0.527 * x[ir] ** 1.61
    y = x[~ir] - 1.82
    a[~ir] = (1 + 0.17699 * y - 0.50447 * y ** 2 - 0.02427 * y ** 3 + 0.72085 * y ** 4
              + 0.01979 * y ** 5 - 0.77530 * y ** 6 + 0.32999 * y ** 7)
    b[~ir] = (1.41338 * y + 2.28305 * y ** 2 + 1.07233 * y ** 3 - 5.38434 * y ** 4
              - 0.62251 * y ** 5 + 5.30260 * y ** 6 - 2.09002 * y ** 7)
    return r_v * (a + b / r_v)


#: Empirical correction of the throughput (knots every 100 A from 3750 A, linear interpolation):
#: the squared ratio of the median S/N-per-pixel profiles (relative to the g band) of real
#: even-obsid DR10 spectra and of their mock twins, so that the mock's S/N runs with wavelength
#: as LAMOST's does (the blue end fainter, the red arm ~1.2 times richer in S/N than the
#: analytic two-arm curve gives).
THROUGHPUT_CORRECTION = np.array([
    0.25, 0.45, 0.58, 0.83, 0.85, 0.85, 0.78, 0.79, 0.87, 0.97, 1.07, 1.09, 1.10, 1.10, 1.09,
    1.08, 1.08, 1.08, 1.05, 0.99, 1.00, 1.60, 1.30, 1.28, 1.30, 1.27, 1.35, 1.42, 1.46, 1.50,
    1.51, 1.48, 1.52, 1.52, 1.48, 1.46, 1.41, 1.46, 1.45, 1.32, 1.34, 1.23, 1.24, 1.26, 1.22,
    1.16, 1.07, 1.02, 1.02, 1.00, 1.11, 1.10, 0.98, 0.90])


def throughput(wave):
    """Relative instrument throughput (counts per flux unit) of the two LAMOST arms: analytic
    blue and red arms through the dichroic, times :data:`THROUGHPUT_CORRECTION`."""
    wave = np.asarray(wave, float)
    lb = np.log(wave / 5000.0)
    blue = np.exp(-0.5 * (lb / np.where(lb < 0, 0.16, 0.30)) ** 2)
    lr = np.log(wave / 7800.0)
    red = 1.9 * np.exp(-0.5 * (lr / np.where(lr < 0, 0.22, 0.16)) ** 2)
    d_blue = 1.0 / (1.0 + np.exp((wave - 5830.0) / 28.0))
    d_red = 1.0 / (1.0 + np.exp(-(wave - 5920.0) / 28.0))
    knots = 3750.0 + 100.0 * np.arange(THROUGHPUT_CORRECTION.size)
    return (blue * d_blue + red * d_red) * np.interp(wave, knots, THROUGHPUT_CORRECTION)


#: Sky continuum counts per pixel at 5500 A (unit exposure, before the throughput).
_SKY_CONTINUUM = 60.0


@functools.lru_cache(maxsize=1)
def _sky_line_counts() -> np.ndarray:
    """Sky emission-line counts per pixel as detected (observed frame, after throughput): the
    spectrum measured from the variance of real even-obsid DR10 files
    (:func:`lamostcannon.mock.linelist.build_sky_lines`)."""
    from .linelist import load_sky_lines

    table = load_sky_lines()
    lines = np.zeros(LAMOST_NPIX)
    lines[table["pixel"].to_numpy(int)] = table["counts"].to_numpy(float)
    return lines


def _sky_counts() -> np.ndarray:
    """Detected sky counts per pixel (observed frame): a smooth continuum through the instrument
    throughput plus the measured emission lines."""
    wave = lamost_wavelength()
    return _SKY_CONTINUUM * (wave / 5500.0) * throughput(wave) + _sky_line_counts()


#: Interstellar absorption (observed frame: the gas is near rest in the heliocentric frame):
#: (name, air wavelength A, equivalent width per mag of E(B-V) in A, intrinsic FWHM A). The
#: diffuse interstellar bands after Herbig (1995) and Friedman et al. (2011); the Na I D doublet
#: separately (:func:`ism_na_d_ew`).
ISM_BANDS = [("DIB 4428", 4428.2, 1.6, 20.0), ("DIB 5780", 5780.5, 0.46, 2.1),
             ("DIB 5797", 5797.1, 0.17, 0.9), ("DIB 6196", 6196.0, 0.06, 0.5),
             ("DIB 6284", 6283.8, 0.9, 3.8), ("DIB 6614", 6613.6, 0.23, 1.1)]
ISM_NA_D = ((5889.95, 0.55), (5895.92, 0.45))   # air A, share of the doublet's EW


def ism_na_d_ew(ebv):
    """Equivalent width (A) of interstellar Na I D1 + D2 for E(B-V) (mag): ``1.05 (E/0.25)^0.6``,
    close to Poznanski et al. (2012) above E(B-V) ~ 0.05 and going to zero with the reddening."""
    return 1.05 * (np.maximum(np.asarray(ebv, float), 0.0) / 0.25) ** 0.6


@functools.lru_cache(maxsize=1)
def _ism_profiles() -> np.ndarray:
    """Unit-EW interstellar profiles (pseudo optical depth per A of EW) on the observed grid,
    rows: Na D2, Na D1, then :data:`ISM_BANDS`."""
    from .linelist import air_to_vacuum

    wave = lamost_wavelength()
    sig_lsf = wave / (LAMOST_R * 2.3548)
    pix = _pixel_width(wave)
    rows = []
    for centre, fwhm in ([(w, 0.1) for w, _ in ISM_NA_D]
                         + [(w, f) for _, w, _, f in ISM_BANDS]):
        c = float(air_to_vacuum(centre))
        sig = np.sqrt((fwhm / 2.3548) ** 2 + sig_lsf ** 2)
        rows.append(pix * np.exp(-0.5 * ((wave - c) / sig) ** 2) / (np.sqrt(2 * np.pi) * sig)
                    / pix)
    return np.array(rows, dtype=np.float32)


def _ism_tau(ebv) -> np.ndarray:
    """Interstellar pseudo optical depth (S, P) for reddening ``ebv`` (S,) mag."""
    ebv = np.maximum(np.asarray(ebv, float), 0.0)
    na = ism_na_d_ew(ebv)
    ew = np.column_stack([na * ISM_NA_D[0][1], na * ISM_NA_D[1][1]]
                         + [ebv * e for _, _, e, _ in ISM_BANDS]).astype(np.float32)
    return ew @ _ism_profiles()


@functools.lru_cache(maxsize=1)
def _telluric_tau() -> np.ndarray:
    """Telluric pseudo optical depth at airmass 1 (observed frame)."""
    from .linelist import air_to_vacuum

    wave = lamost_wavelength()
    tau = np.zeros_like(wave)
    for head, length, depth in ((7594.0, 25.0, 0.05), (6867.0, 12.0, 0.02)):
        hv = float(air_to_vacuum(head))
        d = wave - hv
        tau += depth * np.where(d >= 0, np.exp(-np.maximum(d, 0) / length), 0.0)
    for centre, width, depth in ((7250.0, 45.0, 0.015), (8230.0, 55.0, 0.015),
                                 (9050.0, 70.0, 0.03)):
        tau += depth * np.exp(-0.5 * ((wave - float(air_to_vacuum(centre))) / width) ** 2)
    ker = np.exp(-0.5 * (np.arange(-6, 7) / _SIGMA_LSF_PIX) ** 2)
    return np.convolve(tau, ker / ker.sum(), mode="same")


def _calibration_residual(wave, n, rng):
    """Smooth flux-calibration residual: a random tilt and curvature per spectrum, (n, P)."""
    x = (wave - 6400.0) / 2700.0
    coef = rng.normal(0.0, [0.04, 0.03], size=(n, 2))
    return 1.0 + coef[:, :1] * x[None, :] + coef[:, 1:] * (x[None, :] ** 2 - 0.3)


#: Instrument systematics of real LAMOST spectra that the pipeline leaves in (per spectrum,
#: observed frame), with amplitudes measured on the even-obsid real DR10 stars through the
#: realism benchmark (:mod:`lamostcannon.realism`; the odd obsids test them):
#:
#: ``lsf_var``
#:     rms change (pixel^2) of the LSF variance, drawn per arm: fibre-to-fibre and
#:     camera-to-camera resolution differences.
#: ``ripple_short``, ``ripple_long``
#:     ((rms amplitude in the blue arm, in the red arm), Gaussian correlation length in pixels) of
#:     multiplicative Gaussian random
#:     fields: fixed-pattern (flat-field, fibre trace) residuals and flux-calibration ripples on
#:     the scale of the calibration's spline knots.
#: ``blue_end``, ``red_end``
#:     (amplitude factor, e-folding length A) by which both ripples grow towards the ends of the
#:     two arms (low throughput, scattered light, poor calibration).
#: ``dichroic``
#:     (rms amplitude, centre A, blue width A, red width A): the extra ripple where the blue and
#:     red arms are spliced (the dichroic junction, ~5700-6200 A).
#: ``defects``
#:     (number of columns, probability that a spectrum is hit by each, rms relative amplitude):
#:     unflagged detector defects (hot or weak columns, residual cosmic rays), at fixed
#:     pseudo-random observed-frame pixels (1-2 pixels wide), each present in a few per cent of
#:     the spectra.
#: ``telluric_residual``
#:     rms fraction (O2 bands, H2O bands) of the telluric absorption at airmass 1 left over or
#:     overcorrected by the pipeline's telluric correction: DR10 spectra show no mean A or B band.
#: ``sky_residual``
#:     (rms fraction of the sky emission lines left or over-subtracted, rms wavelength mismatch
#:     in pixels between the sky model and the fibre in the blue arm, in the red arm):
#:     sky-subtraction residuals ``eps sky + delta d sky / d pixel``.
#: ``ivar_scale``
#:     per arm, (mean, rms) of log(reported variance / true variance): the pipeline's noise
#:     estimate is conservative in the blue and scatters from fibre to fibre.
SYSTEMATICS = {
    "lsf_var": 0.30,
    "ripple_short": ((0.0035, 0.0025), 1.5),
    "ripple_long": ((0.006, 0.004), 10.0),
    "blue_end": (7.0, 250.0),
    "red_end": (10.0, 200.0),
    "dichroic": (0.045, 5915.0, 45.0, 110.0),
    "defects": (80, 0.04, 0.08),
    "telluric_residual": (0.25, 0.25),
    "sky_residual": (0.01, 0.15, 0.02),
    "ivar_scale": {"blue": (0.35, 0.35), "red": (0.05, 0.35)},
}


def _arm_weight(wave):
    """Weight of the red arm (0 in the blue arm, 1 in the red arm; the dichroic crossover)."""
    return 1.0 / (1.0 + np.exp(-(np.asarray(wave, float) - 5875.0) / 28.0))


@functools.lru_cache(maxsize=1)
def _ripple_profiles():
    """Amplitude profiles (P,) of the short and long ripples (see :data:`SYSTEMATICS`)."""
    wave = lamost_wavelength()
    sy = SYSTEMATICS
    fb, lb = sy["blue_end"]
    fr, lr = sy["red_end"]
    ends = 1.0 + fb * np.exp(-(wave - wave[0]) / lb) + fr * np.exp((wave - wave[-1]) / lr)
    amp, centre, wb, wr = sy["dichroic"]
    width = np.where(wave < centre, wb, wr)
    dich = amp * np.exp(-0.5 * ((wave - centre) / width) ** 2)
    red = _arm_weight(wave)
    (sb, sr), (lb_, lr_) = sy["ripple_short"][0], sy["ripple_long"][0]
    short = (sb * (1 - red) + sr * red) * ends
    long = np.sqrt(((lb_ * (1 - red) + lr_ * red) * ends) ** 2 + dich ** 2)
    return short.astype(np.float32), long.astype(np.float32)


@functools.lru_cache(maxsize=1)
def _defect_columns():
    """Observed-frame pixels (first pixel, width 1 or 2) of the unflagged detector defects; fixed
    (seeded), like the columns of a real set of CCDs."""
    rng = np.random.default_rng(DEFECT_SEED)
    n = SYSTEMATICS["defects"][0]
    return (np.sort(rng.integers(20, LAMOST_NPIX - 22, n)),
            rng.integers(1, 3, n))


#: Seed of the fixed defect-column positions.
DEFECT_SEED = 5117


def _gaussian_field(rng, n, length_pix):
    """Unit-variance Gaussian random fields (n, P) with a Gaussian correlation of ``length_pix``
    pixels: Gaussian Fourier coefficients times the Gaussian kernel's transfer function (drawn
    only where it exceeds 1e-4), one inverse FFT."""
    from scipy import fft

    p = LAMOST_NPIX
    n_fft = fft.next_fast_len(p + int(8 * length_pix) + 8, real=True)
    freq = np.fft.rfftfreq(n_fft)
    transfer = np.exp(-2.0 * (np.pi * freq * length_pix) ** 2)
    k_max = int(np.searchsorted(-transfer, -1e-4))
    t = transfer[1:k_max]
    coef = np.zeros((n, freq.size), np.complex64)
    draw = rng.standard_normal((n, 2, k_max - 1), dtype=np.float32)
    scale = np.float32(0.5 * n_fft / np.sqrt(np.sum(t ** 2)))
    coef.real[:, 1:k_max] = draw[:, 0] * (t * scale).astype(np.float32)
    coef.imag[:, 1:k_max] = draw[:, 1] * (t * scale).astype(np.float32)
    return fft.irfft(coef, n=n_fft, axis=1)[:, :p]


@functools.lru_cache(maxsize=1)
def _sky_residual_basis():
    """Columns with sky lines, and the lines and their slope there (float32)."""
    lines = _static_observed()["sky_lines"].astype(float)
    slope = np.gradient(lines)
    cols = np.flatnonzero((lines != 0) | (slope != 0))
    return cols, lines[cols].astype(np.float32), slope[cols].astype(np.float32)


def _instrument_systematics(n, rng):
    """Per-spectrum multiplicative ripple (n, P), LSF variance change (n, P) pixel^2, variance
    misestimate factor (n, P) and sky-subtraction residual counts (n, P); see
    :data:`SYSTEMATICS`."""
    f32 = np.float32
    sy = SYSTEMATICS
    red = _static_observed()["red"]
    blue = f32(1.0) - red
    short_amp, long_amp = _ripple_profiles()
    ripple = _gaussian_field(rng, n, sy["ripple_short"][1])
    ripple *= short_amp[None, :]
    long = _gaussian_field(rng, n, sy["ripple_long"][1])
    long *= long_amp[None, :]
    ripple += long
    ripple += f32(1.0)
    cols, width = _defect_columns()
    hit = np.nonzero(rng.uniform(size=(n, cols.size)) < sy["defects"][1])
    amp = rng.normal(0.0, sy["defects"][2], hit[0].size).astype(f32)
    for off in range(2):
        use = off < width[hit[1]]
        np.add.at(ripple, (hit[0][use], cols[hit[1][use]] + off), amp[use])
    np.maximum(ripple, f32(0.5), out=ripple)
    dv = rng.normal(0.0, sy["lsf_var"], (n, 2)).astype(f32)
    lsf = dv[:, :1] * blue[None, :] + dv[:, 1:] * red[None, :]
    (mb, sb), (mr, sr) = sy["ivar_scale"]["blue"], sy["ivar_scale"]["red"]
    vb = np.exp(rng.normal(mb, sb, (n, 1))).astype(f32)
    vr = np.exp(rng.normal(mr, sr, (n, 1))).astype(f32)
    var_scale = vb * blue[None, :] + vr * red[None, :]
    frac, shift_b, shift_r = sy["sky_residual"]
    sky_cols, lines, slope = _sky_residual_basis()
    rc = red[sky_cols]
    shift = (rng.normal(0.0, shift_b, (n, 1)) * (1 - rc)[None, :]
             + rng.normal(0.0, shift_r, (n, 1)) * rc[None, :]).astype(f32)
    sky_res = np.zeros((n, LAMOST_NPIX), f32)
    sky_res[:, sky_cols] = (rng.normal(0.0, frac, (n, 1)).astype(f32) * lines[None, :]
                            + shift * slope[None, :])
    return ripple, lsf, var_scale, sky_res


def _broaden(tau, dvar):
    """Change the LSF variance of a pseudo optical depth by ``dvar`` (pixel^2, per pixel):
    ``tau + dvar/2 d^2 tau/dx^2`` (heat-equation step; small changes)."""
    lap = np.zeros_like(tau)
    lap[:, 1:-1] = tau[:, 2:] - 2.0 * tau[:, 1:-1] + tau[:, :-2]
    lap *= np.float32(0.5) * dvar
    tau += lap
    return tau


# ------------------------------------------------------------------------------------------------
# LAMOST synthesis
# ------------------------------------------------------------------------------------------------

def _rest_tau(lab: dict, model: dict | None = None) -> np.ndarray:
    """Rest-frame low-resolution pseudo optical depth on the extended grid, (S, _NEXT) float32."""
    model = _default_model() if model is None else model
    lines = model["lines"]
    lt, la, dl = _line_quantities(lines.wave_air, lines.chi, lines.base, lines.damp, lines.species,
                                  lines.species_list, lab)
    ew_pix = dl * reduced_width(lt, la)                                # (S, N) A
    ew_pix *= (1.0 / _pixel_width(lines.wave_vac)).astype(np.float32)[None, :]   # -> pixels
    wide = lines.wide
    narrow_ew = np.where(wide[None, :], np.float32(0.0), ew_pix)
    tau = np.ascontiguousarray((model["narrow"].T @ narrow_ew.T).T, dtype=np.float32)
    setup = model["wide"]
    _apply_wide(tau, ew_pix[:, wide], *setup["metal"])
    h = _hydrogen()
    c_h = hydrogen_wing_parameter(lab)                                 # A^2
    ew_h = 2.0 * np.sqrt(np.pi * c_h) / _pixel_width(h["wave_vac"])[None, :]
    _apply_wide(tau, ew_h, *setup["hydrogen"])
    tau += (_band_tau(lab).astype(np.float32) @ _band_shapes())
    return tau


def lamost_absorption(stars, *, rest_frame: bool = True) -> np.ndarray:
    """Noiseless line absorption ``exp(-tau)`` at the LAMOST resolution on its grid, (S, 3909).

    The mock's "true normalised spectrum": lines, hydrogen and molecular bands only (no
    continuum, reddening, tellurics, instrument or noise). ``rest_frame=False`` applies each star's
    ``rv`` (column needed then). Columns as for :func:`synthesize_lamost` (``rv``, ``ebv``,
    ``snrg`` may be absent).
    """
    cols = {c: (stars[c] if c in stars else np.zeros(len(stars["teff"])))
            for c in _REQUIRED}
    lab = _label_columns(cols)
    with _single_blas_thread():
        tau = _rest_tau(lab)
        if not rest_frame:
            tau = _shift(tau, np.log10(1.0 + lab["rv"] / C_KMS) / LAMOST_LOG10_STEP)
    tau = np.maximum(tau[:, _PAD:_PAD + LAMOST_NPIX], 0.0)
    return np.exp(-tau).astype(np.float32)


def equivalent_widths(stars) -> np.ndarray:
    """Equivalent widths (A) of every line of the packaged line list for each star, (S, N) float32.

    Row order of :func:`lamostcannon.mock.linelist.load_linelist`; hydrogen lines and molecular
    bands are not included (see :func:`hydrogen_wing_parameter`).
    """
    cols = {c: (stars[c] if c in stars else np.zeros(len(stars["teff"])))
            for c in _REQUIRED}
    lab = _label_columns(cols)
    lines = _lines()
    lt, la, dl = _line_quantities(lines.wave_air, lines.chi, lines.base, lines.damp, lines.species,
                                  lines.species_list, lab)
    return dl * reduced_width(lt, la)


def _shift(tau: np.ndarray, shift_pix: np.ndarray) -> np.ndarray:
    """Translate each row by ``shift_pix`` pixels (FFT phase shift after removing a linear trend,
    zero-padded to a fast FFT length)."""
    from scipy import fft

    n = tau.shape[1]
    n_fft = fft.next_fast_len(n + 16, real=True)
    x = np.arange(n, dtype=np.float32)
    first, last = tau[:, :1], tau[:, -1:]
    slope = (last - first) / np.float32(n - 1)
    detr = tau - (first + slope * x[None, :])
    freq = np.fft.rfftfreq(n_fft).astype(np.float32)
    shift32 = shift_pix.astype(np.float32)[:, None]
    phase = np.exp(np.complex64(-2j * np.pi) * freq[None, :] * shift32)
    spec = fft.rfft(detr, n=n_fft, axis=1, workers=-1)
    spec *= phase
    out = fft.irfft(spec, n=n_fft, axis=1, workers=-1)[:, :n]
    out += first + slope * (x[None, :] - shift_pix.astype(np.float32)[:, None])
    return out


def _draw_runs(rng, n, mean, min_len, max_len):
    """Poisson(mean) runs of pixels per spectrum: (spectrum index, start, length) arrays."""
    counts = rng.poisson(mean, n)
    star = np.repeat(np.arange(n), counts)
    length = rng.integers(min_len, max_len, star.size)
    start = rng.integers(0, LAMOST_NPIX - max_len, star.size)
    return star, start, length


def _run_pixels(star, start, length):
    """Row and column indices of all pixels in the runs."""
    rows = np.repeat(star, length)
    offsets = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
    return rows, np.repeat(start, length) + offsets


def _median_good(values, good):
    """Row medians over ``good`` pixels (bad ones replaced alternately by -inf/+inf, which leaves
    the median of the good ones unchanged to within a pixel); 0 where nothing is good."""
    alt = np.where(np.arange(values.shape[1]) % 2 == 0, -np.inf, np.inf).astype(values.dtype)
    med = np.median(np.where(good, values, alt[None, :]), axis=1)
    med = np.where(np.isfinite(med) & (good.sum(axis=1) > 0), med, 0.0)
    return np.maximum(med, 0.0).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _static_observed():
    """Wavelength-only arrays of the observed frame (float32): wave, extinction curve, throughput,
    sky counts x throughput, telluric tau, water-band selector."""
    wave = lamost_wavelength()
    thr = throughput(wave)
    water = (wave > 7000) & ((wave < 7550) | (wave > 7800))
    f = np.float32
    return {"wave": wave.astype(f), "ext": ccm_extinction(wave).astype(f), "thr": thr.astype(f),
            "sky": _sky_counts().astype(f), "sky_lines": _sky_line_counts().astype(f),
            "tell": _telluric_tau().astype(f), "water": water, "red": _arm_weight(wave).astype(f),
            "gband": (wave >= SNR_BANDS["g"][0]) & (wave < SNR_BANDS["g"][1])}


def _synth_chunk(lab: dict, rng: np.random.Generator, systematics: bool = True) -> dict:
    f32 = np.float32
    n = lab["teff"].size
    st = _static_observed()
    wave, thr, sky = st["wave"], st["thr"], st["sky"]
    tau_rest = _rest_tau(lab)
    shift = np.log10(1.0 + lab["rv"] / C_KMS) / LAMOST_LOG10_STEP
    tau = _shift(tau_rest, shift)[:, _PAD:_PAD + LAMOST_NPIX]
    np.maximum(tau, 0.0, out=tau)
    if systematics:
        ripple, dlsf, var_scale, sky_res = _instrument_systematics(n, rng)
        _broaden(tau, dlsf)
        np.maximum(tau, 0.0, out=tau)
    if systematics:   # residuals of the pipeline's telluric correction (either sign)
        o2, h2o = SYSTEMATICS["telluric_residual"]
        res_o2 = rng.normal(0.0, o2, n).astype(f32)
        res_h2o = rng.normal(0.0, h2o, n).astype(f32)
        tau += st["tell"][None, :] * np.where(st["water"][None, :], res_h2o[:, None],
                                              res_o2[:, None])
    tau += _ism_tau(lab["ebv"])
    # continuum: Planck x reddening x calibration residual (the SED is smooth, so its rv shift
    # is immaterial); the line absorption exp(-tau); everything float32
    x = f32(1.438777e8) / (wave[None, :] * lab["teff"].astype(f32)[:, None])
    sed = (wave / f32(5000.0))[None, :] ** f32(-5.0) / np.expm1(np.minimum(x, f32(80.0)))
    sed *= np.power(f32(10.0), f32(-0.4) * lab["ebv"].astype(f32)[:, None] * st["ext"][None, :])
    sed *= _calibration_residual(wave, n, rng).astype(f32)
    if systematics:
        sed *= ripple
    np.negative(tau, out=tau)
    np.exp(tau, out=tau)
    counts = sed * tau                                                  # (S, P), arbitrary scale
    counts *= thr[None, :]
    read2 = f32(25.0)
    ref = np.median(counts[:, st["gband"]], axis=1)
    sky_g = float(np.median(sky[st["gband"]])) + float(read2)
    s2 = np.maximum(lab["snrg"], 0.5) ** 2
    if systematics:   # the target is the S/N of the reported (misestimated) variance
        s2 = s2 * np.median(var_scale[:, st["gband"]], axis=1)
    n_g = 0.5 * s2 * (1.0 + np.sqrt(1.0 + 4.0 * sky_g / s2))   # counts giving the target S/N
    counts *= (n_g / np.maximum(ref, 1e-30)).astype(f32)[:, None]
    var = counts + (sky + read2)[None, :]
    # flux units: counts / throughput / gain-like constant, with a random calibration scale
    gain = (3.0 * rng.lognormal(0.0, 0.15, n)).astype(f32)
    conv = f32(1.0) / (thr[None, :] * gain[:, None])
    sigma = np.sqrt(var)
    sigma *= conv
    noise = rng.standard_normal((n, LAMOST_NPIX), dtype=f32)
    noise *= sigma
    flux = counts * conv
    flux += noise
    if systematics:   # sky-subtraction residual; the pipeline's own variance estimate
        flux += sky_res * conv
        sigma = sigma * np.sqrt(var_scale)
    ivar = f32(1.0) / (sigma * sigma)
    andmask = np.zeros((n, LAMOST_NPIX), np.int32)
    ormask = np.zeros((n, LAMOST_NPIX), np.int32)
    # bright sky: sky variance dominates
    bright = (sky[None, :] > 30.0 * np.maximum(counts, 1.0)) & (sky[None, :] > 150.0)
    ormask[bright] |= MASK_BITS["BRIGHTSKY"]
    # bad columns and dead pixels (andmask, ivar 0), dead red ends
    star, start, length = _draw_runs(rng, n, 1.2, 2, 10)
    rows, cols = _run_pixels(star, start, length)
    andmask[rows, cols] |= MASK_BITS["BADPIX"]
    n_dead = rng.poisson(1.5, n)
    andmask[np.repeat(np.arange(n), n_dead), rng.integers(0, LAMOST_NPIX, n_dead.sum())] |= (
        MASK_BITS["BADPIX"])
    dead = np.nonzero(rng.uniform(size=n) < 0.1)[0]
    end_len = rng.integers(3, 40, dead.size)
    rows, cols = _run_pixels(dead, LAMOST_NPIX - end_len, end_len)
    andmask[rows, cols] |= MASK_BITS["NODATA"]
    bad = andmask != 0
    ivar[bad] = 0.0
    flux[bad & (rng.uniform(size=(n, 1)) < 0.5)] = 0.0
    # cosmic rays: positive spikes of 5-60 sigma, flagged in ormask only
    star, start, length = _draw_runs(rng, n, 2.0, 1, 3)
    rows, cols = _run_pixels(star, start, length)
    amp = np.repeat(rng.uniform(5.0, 60.0, star.size), length)
    flux[rows, cols] += (amp * sigma[rows, cols]).astype(np.float32)
    ormask[rows, cols] |= MASK_BITS["COSMIC"]
    out = {"flux": flux, "ivar": ivar, "andmask": andmask, "ormask": ormask}
    snr = flux * np.sqrt(ivar)
    for band, (lo, hi) in SNR_BANDS.items():
        sel = (wave >= lo) & (wave < hi)
        out[f"snr{band}"] = _median_good(snr[:, sel], ivar[:, sel] > 0)
    sigma_v = np.hypot(3.0, 150.0 / np.maximum(lab["snrg"], 1.0))
    out["z"] = (lab["rv"] + sigma_v * rng.standard_normal(n)) / C_KMS
    return out


def synthesize_lamost(stars, rng: np.random.Generator, *, chunk_size: int = 2000,
                      systematics: bool = True) -> dict:
    """Mock LAMOST low-resolution spectra (observed frame, not normalised).

    Parameters
    ----------
    stars : pandas.DataFrame (or mapping of equal-length arrays), S rows
        ``teff`` (K), ``logg`` (dex), ``vmic`` (km/s), ``fe_h`` (dex), ``<x>_fe`` for x in
        :data:`lamostcannon.labels.ELEMENTS` (dex), ``rv`` (km/s, heliocentric), ``ebv`` (mag),
        ``snrg`` (target median S/N per pixel in the g band).
    rng : numpy.random.Generator
        All noise, masks and per-spectrum calibration draws come from it.
    chunk_size : int
        Stars synthesised at a time (memory ~ 0.2 MB per star).
    systematics : bool
        Add the instrument systematics of :data:`SYSTEMATICS` (default); False gives the
        idealised instrument (photon, sky and read noise only), e.g. for line-by-line comparisons.

    Returns
    -------
    dict
        ``flux``, ``ivar`` (S, 3909) float32 on :func:`lamost_wavelength` (LAMOST-like flux units:
        continuum x calibration x lines, with noise); ``andmask``, ``ormask`` (S, 3909) int32 (bits
        in :data:`MASK_BITS`; ``ivar = 0`` wherever ``andmask != 0``); ``snru`` ... ``snrz`` (S,)
        float32, median ``flux * sqrt(ivar)`` over the bands of :data:`SNR_BANDS`; ``z`` (S,)
        float64, ``rv / c`` plus a pipeline-like error of ``hypot(3, 150/snrg)`` km/s.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator; got {type(rng).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}")
    lab = _label_columns(stars)
    n = lab["teff"].size
    keys = ("flux", "ivar", "andmask", "ormask", "snru", "snrg", "snrr", "snri", "snrz", "z")
    if n == 0:
        empty2 = {"flux": np.float32, "ivar": np.float32, "andmask": np.int32, "ormask": np.int32}
        out = {k: np.empty((0, LAMOST_NPIX), t) for k, t in empty2.items()}
        out.update({k: np.empty(0, np.float32) for k in keys[4:9]})
        out["z"] = np.empty(0)
        return out
    parts = []
    sub = min(chunk_size, 500)  # internal block size keeps temporaries small
    with _single_blas_thread():
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            for s0 in range(start, stop, sub):
                s1 = min(stop, s0 + sub)
                parts.append(_synth_chunk({k: v[s0:s1] for k, v in lab.items()}, rng,
                                          systematics))
            log.debug("synthesised LAMOST spectra %d-%d of %d", start, stop, n)
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def _single_blas_thread():
    """Context limiting BLAS to one thread: the products here are small and many, and threaded
    BLAS on them is up to 50x slower on a loaded machine. A no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


# ------------------------------------------------------------------------------------------------
# GALAH line windows
# ------------------------------------------------------------------------------------------------

GALAH_WINDOW_MARGIN = 0.25     # A added on each side of every Table 2 window
GALAH_SAMPLING = 100000.0      # lambda / delta lambda of the GALAH-like pixels
_GALAH_OVERSAMPLE = 3


@functools.lru_cache(maxsize=1)
def _galah_setup() -> dict:
    from scipy import sparse

    from .linelist import GALAH_WINDOWS

    intervals = sorted((lo - GALAH_WINDOW_MARGIN, hi + GALAH_WINDOW_MARGIN)
                       for x in ELEMENTS for lo, hi in GALAH_WINDOWS[x])
    merged = []
    for lo, hi in intervals:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    pix, fine, rows, cols, vals = [], [], [], [], []
    n_pix = n_fine = 0
    for lo, hi in merged:
        step = 0.5 * (lo + hi) / GALAH_SAMPLING
        p = np.arange(lo, hi + 0.5 * step, step)
        p = p[p <= hi]
        sigma = 0.5 * (lo + hi) / (GALAH_R * 2.3548)
        margin = 5 * sigma
        f = np.arange(lo - margin, hi + margin + step / 6, step / _GALAH_OVERSAMPLE)
        for i, w in enumerate(p):
            d = f - w
            sel = np.nonzero(np.abs(d) < margin)[0]
            k = np.exp(-0.5 * (d[sel] / sigma) ** 2)
            rows.append(np.full(sel.size, n_pix + i))
            cols.append(sel + n_fine)
            vals.append(k / k.sum())
        pix.append(p)
        fine.append(f)
        n_pix += p.size
        n_fine += f.size
    conv = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                             shape=(n_pix, n_fine))
    wave = np.concatenate(pix)
    fine = np.concatenate(fine)
    # lines affecting the windows (air wavelengths), and their (line, fine pixel) pairs
    lines = _lines()
    reach = 1.5
    near = np.zeros(lines.wave_air.size, bool)
    for lo, hi in merged:
        near |= (lines.wave_air > lo - reach) & (lines.wave_air < hi + reach)
    near &= lines.galah
    idx = np.nonzero(near)[0]
    pair_line, pair_pix, pair_dx = [], [], []
    for j, li in enumerate(idx):
        sel = np.nonzero(np.abs(fine - lines.wave_air[li]) < reach)[0]
        pair_line.append(np.full(sel.size, j))
        pair_pix.append(sel)
        pair_dx.append(fine[sel] - lines.wave_air[li])
    pair_line = np.concatenate(pair_line)
    pair_pix = np.concatenate(pair_pix)
    gather = sparse.csr_matrix((np.ones(pair_pix.size), (np.arange(pair_pix.size), pair_pix)),
                               shape=(pair_pix.size, fine.size))
    return {"wave": wave, "fine": fine, "conv": conv, "lines": idx, "pair_line": pair_line,
            "pair_dx": np.concatenate(pair_dx), "gather": gather}


def galah_windows_wavelength() -> np.ndarray:
    """GALAH-like pixels inside the Table 2 windows of the 11 elements (+0.25 A), AIR Angstrom.

    Sampling ``lambda / 100,000`` (about 3.5 pixels per R = 28,000 resolution element), ascending.
    """
    return _galah_setup()["wave"].copy()


def _galah_normalised(lab: dict, chunk: int = 256) -> np.ndarray:
    """Noiseless, normalised R = 28,000 flux in the windows, (S, Npix) float32."""
    g = _galah_setup()
    lines = _lines()
    idx = g["lines"]
    h = _hydrogen()
    out = np.empty((lab["teff"].size, g["wave"].size), np.float32)
    for s0 in range(0, lab["teff"].size, chunk):
        sl = {k: v[s0:s0 + chunk] for k, v in lab.items()}
        lt, la, dl = _line_quantities(lines.wave_air[idx], lines.chi[idx], lines.base[idx],
                                      lines.damp[idx], lines.species[idx], lines.species_list, sl,
                                      hyperfine=False)
        tau0 = 10.0 ** lt[:, g["pair_line"]]
        a = 10.0 ** la[:, g["pair_line"]]
        x = g["pair_dx"][None, :] / dl[:, g["pair_line"]]
        prof = np.exp(-x * x) + a / (np.sqrt(np.pi) * (1.0 + x * x))
        tau = np.asarray((g["gather"].T @ (tau0 * prof).T).T)
        c_h = hydrogen_wing_parameter(sl)
        for k, w in enumerate(h["wave_air"]):
            d2 = (g["fine"] - w) ** 2
            if d2.min() < 80.0 ** 2:
                tau += c_h[:, k, None] / np.maximum(d2, 0.01)[None, :]
        out[s0:s0 + chunk] = np.asarray((g["conv"] @ np.exp(-tau).T).T, dtype=np.float32)
    return out


def synthesize_galah_windows(true_stars, reported_stars, snr, rng: np.random.Generator) -> dict:
    """GALAH-like normalised spectra in the Table 2 windows and the GALAH best-fit model.

    Parameters
    ----------
    true_stars, reported_stars : pandas.DataFrame, S rows each
        Label columns as for :func:`synthesize_lamost` (``rv``, ``ebv`` and ``snrg`` are not used
        and may be absent). ``flux`` is made from the true labels, ``model`` from the reported
        (GALAH best-fit) labels, so a star with wrong reported labels has a large windowed chi2.
    snr : array_like, shape (S,)
        S/N per pixel of the GALAH spectrum (e.g. ``snr_c2``); ``sigma = 1 / snr``.
    rng : numpy.random.Generator

    Returns
    -------
    dict
        ``wave`` (Npix,) air A (:func:`galah_windows_wavelength`); ``flux``, ``sigma``, ``model``
        (S, Npix) float32.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator; got {type(rng).__name__}")
    fill = {"rv": 0.0, "ebv": 0.0, "snrg": 100.0}

    def prep(stars):
        cols = {c: (stars[c] if c in stars else np.full(len(stars["teff"]), fill[c]))
                for c in _REQUIRED}
        return _label_columns(cols)

    true_lab = prep(true_stars)
    rep_lab = prep(reported_stars)
    snr = np.asarray(snr, dtype=float)
    n = true_lab["teff"].size
    if rep_lab["teff"].size != n or snr.shape != (n,):
        raise ValueError(f"true_stars ({n}), reported_stars ({rep_lab['teff'].size}) and snr "
                         f"{snr.shape} must have the same length")
    if np.any(~np.isfinite(snr)) or np.any(snr <= 0):
        raise ValueError("snr must be finite and positive")
    wave = galah_windows_wavelength()
    clean = _galah_normalised(true_lab)
    model = _galah_normalised(rep_lab)
    sigma = np.broadcast_to((1.0 / snr)[:, None], clean.shape).astype(np.float32)
    flux = (clean + sigma * rng.standard_normal(clean.shape, dtype=np.float32)).astype(np.float32)
    return {"wave": wave, "flux": flux, "sigma": np.ascontiguousarray(sigma), "model": model}


# ------------------------------------------------------------------------------------------------
# Realism check against real LAMOST spectra
# ------------------------------------------------------------------------------------------------

def solar_scaled_stars(teff, logg, fe_h, *, rv=0.0, ebv=0.0, snrg=100.0, vmic=None):
    """A DataFrame of stars with solar-scaled abundances ([alpha/Fe] = +0.4 x -[Fe/H] for
    [Fe/H] < 0, capped at 0.3, for O, Mg, Si, Ca, Ti; other [X/Fe] = 0) and, unless given,
    ``vmic = 1 + 0.3 (4.44 - logg)`` km/s within 0.8-2.5 (roughly the GALAH relation)."""
    import pandas as pd

    teff = np.atleast_1d(np.asarray(teff, float))
    n = teff.size

    def col(v):
        return np.broadcast_to(np.asarray(v, float), (n,)).copy()

    logg, fe_h = col(logg), col(fe_h)
    vmic = col(np.clip(1.0 + 0.3 * (4.44 - logg), 0.8, 2.5) if vmic is None else vmic)
    alpha = np.clip(-0.3 * fe_h, 0.0, 0.3)
    data = {"teff": teff, "logg": logg, "vmic": vmic, "fe_h": fe_h}
    for x in ELEMENTS:
        data[f"{x}_fe"] = alpha if x in ("o", "mg", "si", "ca", "ti") else np.zeros(n)
    data.update(rv=col(rv), ebv=col(ebv), snrg=col(snrg))
    return pd.DataFrame(data)


def realism_rms(real_path, teff, logg, fe_h, *, seed: int = 0, ebv: float = 0.0,
                wave_range=(4000.0, 8800.0), noiseless: bool = True) -> dict:
    """Compare one real LAMOST spectrum with a mock of the same star, both normalised alike.

    The mock uses the given labels (e.g. the LASP teff/logg/[Fe/H]), solar-scaled abundances,
    ``rv = c z`` from the real file and its g-band S/N. Both spectra are shifted to the rest frame,
    put on the common grid (:func:`lamostcannon.spectra.resample`) and continuum-normalised by
    :func:`lamostcannon.spectra.continuum` (Gaussian smoothing, sigma 50 A) with the same weights
    (the real spectrum's inverse variance, where both are good), so that both go through exactly
    the same normalisation. The figure of merit is the rms of the difference of the
    normalised fluxes over pixels good in both within ``wave_range`` (rest, A).

    Parameters
    ----------
    real_path : path of a LAMOST ``spec-*.fits(.gz)`` file.
    teff, logg, fe_h : labels for the mock.
    seed : seed of the mock's noise and masks.
    ebv : reddening of the mock (it barely matters after normalisation).
    noiseless : if True (default), compare with a mock at S/N 10,000 without instrument
        systematics, so the rms measures the model mismatch plus the real spectrum's noise only.

    Returns
    -------
    dict with ``wave`` (3909,) rest vacuum A, ``real``, ``mock`` normalised fluxes (3909,),
    ``good`` (3909,) bool, ``rms`` (float), ``rms_noise`` (expected rms from the real ivar alone),
    ``labels`` (dict). Pixels outside ``good`` are NaN in ``real`` and ``mock``.
    """
    from .. import spectra

    real = spectra.read_lamost(real_path)
    z = float(real.meta["z"])
    snrg = float(real.meta.get("snrg", 100.0))
    stars = solar_scaled_stars(teff, logg, fe_h, rv=z * C_KMS, ebv=ebv,
                               snrg=1e4 if noiseless else max(snrg, 1.0))
    mock = synthesize_lamost(stars, np.random.default_rng(seed), systematics=not noiseless)
    mock_spec = spectra.LamostSpectrum(
        wavelength=lamost_wavelength(), flux=mock["flux"][0], ivar=mock["ivar"][0],
        andmask=mock["andmask"][0].astype(np.int64), ormask=mock["ormask"][0].astype(np.int64),
        meta={"z": z, "filename": "mock"})
    rf, ri = spectra.resample(real)
    mf, mi = spectra.resample(mock_spec)
    both = (ri > 0) & (mi > 0)
    weights = np.where(both, ri, 0.0)   # the same smoothing weights for both spectra
    cont_r = spectra.continuum(np.where(both, rf, 0.0), weights)
    cont_m = spectra.continuum(np.where(both, mf, 0.0), weights)
    wave = spectra.common_wavelength()
    good = (both & (cont_r > 0) & (cont_m > 0) & (wave >= wave_range[0])
            & (wave <= wave_range[1]))
    rf = np.where(good, rf / np.where(good, cont_r, 1.0), np.nan)
    mf = np.where(good, mf / np.where(good, cont_m, 1.0), np.nan)
    ri = np.where(good, ri * np.where(good, cont_r, 0.0) ** 2, 0.0)
    diff = (rf - mf)[good]
    rms = float(np.sqrt(np.mean(diff ** 2)))
    rms_noise = float(np.sqrt(np.mean(1.0 / ri[good])))  # what the real noise alone contributes
    return {"wave": wave, "real": rf, "mock": mf, "good": good, "rms": rms,
            "rms_noise": rms_noise,
            "labels": {"teff": float(teff), "logg": float(logg), "fe_h": float(fe_h), "z": z,
                       "file": real.meta.get("filename", str(real_path))}}


#: Real-spectrum types compared with the mock in notebook 01 and the realism tests:
#: name -> (teff range K, logg range) of the LASP labels.
REALISM_TYPES = {
    "G dwarf": ((5600.0, 5900.0), (4.2, 9.0)),
    "K giant": ((4500.0, 5000.0), (-9.0, 3.0)),
    "F dwarf": ((6300.0, 6700.0), (4.0, 9.0)),
    "K dwarf": ((4700.0, 5100.0), (4.3, 9.0)),
}


def pick_realism_star(catalog, kind: str):
    """The highest-S/N real DR10 star of a type that the empirical line forest did not see.

    Parameters
    ----------
    catalog : pandas.DataFrame
        ``dr10/catalog.csv`` of the real LAMOST folder (obsid, filename, snrg, teff, logg, feh).
    kind : str
        A key of :data:`REALISM_TYPES`.

    Returns
    -------
    pandas.Series, the catalogue row. Only odd obsids qualify: the even ones calibrated the
    weak-line forest (see :mod:`lamostcannon.mock.linelist`), so the comparison is held out.
    """
    (t_lo, t_hi), (g_lo, g_hi) = REALISM_TYPES[kind]
    c = catalog
    sel = (c.teff > t_lo) & (c.teff < t_hi) & (c.logg > g_lo) & (c.logg < g_hi) & (c.obsid % 2 == 1)
    if not sel.any():
        raise ValueError(f"no held-out real star of type {kind!r} in the catalogue")
    return c[sel].sort_values("snrg").iloc[-1]
