"""The mock Milky Way: populations, isochrone-like stellar parameters, positions and velocities.

Four populations (thin disk, thick disk, in-situ halo, accreted halo) are defined by density laws
(exponential disks with flaring scale heights, flattened power-law haloes) and velocity laws
(Gaussian velocity ellipsoids around a mean rotation set by the circular velocity of galpy's
``MWPotential2014`` minus the asymmetric drift; radially anisotropic accreted halo). Stars are
drawn *as a magnitude-limited survey sees them*: a star of absolute magnitude ``M_G`` is visible
out to ``d_max = 10**((G_lim - M_G + 5) / 5)`` pc, so its chance of being seen is proportional to
the population's number of stars inside that distance. :func:`sample_stars` draws stars from the
intrinsic population (IMF, age distribution, evolutionary phase), keeps each with probability
proportional to that visible volume, and then places it along the line of sight by inverse-CDF
sampling on a precomputed (direction x distance) grid.

Coordinates follow astropy's :class:`~astropy.coordinates.Galactocentric` frame with the Sun at
``X = -8 kpc`` (8 kpc from the centre in the plane), ``z = 25 pc`` and velocity
``(11.1, 232.24, 7.25) km/s``; Galactocentric cylindrical velocities ``vR, vT, vz`` are given with
``vT > 0`` for stars rotating with the disk (the Sun has ``vT = 232.24 km/s``). The recipe and the
numbers are documented in ``docs/mock_universe.md``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: Solar position and motion (paper section 5.1).
R_SUN_KPC = 8.0
Z_SUN_KPC = 0.025
V_SUN_KMS = (11.1, 232.24, 7.25)
#: galpy natural units of MWPotential2014 used for the circular velocity.
RO_KPC, VO_KMS = 8.0, 220.0

#: Kept range of effective temperature (K): FGK-dominated, like the paper's training set.
TEFF_RANGE = (3800.0, 7000.0)

POPULATIONS = ("thin", "thick", "halo_insitu", "halo_accreted")

# Thin-disk age bins (Gyr) with their scale heights at the solar circle (kpc).
_THIN_AGE_BINS = ((0.0, 1.0, 0.10), (1.0, 3.0, 0.17), (3.0, 6.0, 0.26), (6.0, 10.0, 0.36))


@dataclass(frozen=True)
class Component:
    """One density component (a population or a thin-disk age slice).

    ``kind`` is ``"disk"`` (exponential in R with scale length ``h_R``, exponential in z with scale
    height ``h_z * exp((R - R_sun) / R_flare)``) or ``"halo"`` (``(r_q**2 + r_c**2)**(-n/2)`` with
    ``r_q**2 = R**2 + (z/q)**2``). ``local`` is the number density at the Sun relative to the thin
    disk's total.
    """

    name: str
    population: str
    kind: str
    local: float
    age_range: tuple[float, float]
    h_R: float = 2.6
    h_z: float = 0.3
    R_flare: float = 10.0
    n: float = 3.0
    q: float = 1.0
    r_c: float = 1.0


def components() -> tuple[Component, ...]:
    """The density components of the mock Galaxy (see the module docstring)."""
    comps = []
    # Thin disk: constant star formation over 10 Gyr; the surface density of each age slice is
    # proportional to its duration, so its midplane density is proportional to duration / (2 h_z).
    weights = np.array([(a1 - a0) / (2 * hz) for a0, a1, hz in _THIN_AGE_BINS])
    weights /= weights.sum()
    for (a0, a1, hz), w in zip(_THIN_AGE_BINS, weights):
        comps.append(Component(f"thin_{a0:g}_{a1:g}", "thin", "disk", float(w), (a0, a1),
                               h_R=2.6, h_z=hz, R_flare=9.0))
    comps.append(Component("thick", "thick", "disk", 0.06, (9.0, 12.5), h_R=2.0, h_z=0.9,
                           R_flare=14.0))
    comps.append(Component("halo_insitu", "halo_insitu", "halo", 0.0010, (10.5, 13.0),
                           n=2.8, q=0.65, r_c=1.0))
    comps.append(Component("halo_accreted", "halo_accreted", "halo", 0.0025, (10.0, 13.0),
                           n=3.3, q=0.85, r_c=1.0))
    return tuple(comps)


def density(comp: Component, R, z, *, flare_cap: float = 4.0):
    """Number density of ``comp`` at Galactocentric cylindrical ``R``, ``z`` (kpc), relative units.

    Normalised so that the density at the Sun is ``comp.local``.
    """
    R = np.asarray(R, float)
    z = np.asarray(z, float)
    if comp.kind == "disk":
        hz = comp.h_z * np.minimum(np.exp((R - R_SUN_KPC) / comp.R_flare), flare_cap)
        hz = np.maximum(hz, 0.5 * comp.h_z)
        hz_sun = comp.h_z
        surface = np.exp(-(R - R_SUN_KPC) / comp.h_R)
        rho = surface * (hz_sun / hz) * np.exp(-(np.abs(z) - Z_SUN_KPC) / hz)
        return comp.local * rho
    rq2 = R**2 + (z / comp.q) ** 2 + comp.r_c**2
    rq2_sun = R_SUN_KPC**2 + (Z_SUN_KPC / comp.q) ** 2 + comp.r_c**2
    rho = (rq2 / rq2_sun) ** (-comp.n / 2.0)
    rho = np.where(rq2 > 60.0**2, 0.0, rho)
    return comp.local * rho


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------

def galactocentric_frame():
    """astropy Galactocentric frame with the paper's solar position and motion."""
    import astropy.units as u
    from astropy.coordinates import CartesianDifferential, Galactocentric

    return Galactocentric(
        galcen_distance=np.hypot(R_SUN_KPC, Z_SUN_KPC) * u.kpc,
        z_sun=Z_SUN_KPC * 1000 * u.pc,
        galcen_v_sun=CartesianDifferential(list(V_SUN_KMS) * u.km / u.s),
    )


@lru_cache(maxsize=1)
def _sun_and_axes():
    """Galactocentric position of the Sun and the linear map (ra, dec) unit vector -> GC vector."""
    import astropy.units as u
    from astropy.coordinates import ICRS

    frame = galactocentric_frame()
    pts = ICRS(ra=[0.0, 0.0, 90.0, 0.0] * u.deg, dec=[0.0, 0.0, 0.0, 90.0] * u.deg,
               distance=[1e-9, 1.0, 1.0, 1.0] * u.kpc)
    gc = pts.transform_to(frame)
    xyz = np.vstack([gc.x.to_value(u.kpc), gc.y.to_value(u.kpc), gc.z.to_value(u.kpc)]).T
    sun = xyz[0]
    # columns: images of ICRS unit vectors ex, ey, ez
    M = (xyz[1:] - sun).T
    return sun, M


def icrs_to_galactocentric_xyz(ra_deg, dec_deg, dist_kpc):
    """Galactocentric Cartesian position (kpc) of ICRS positions; exact (the map is affine)."""
    sun, M = _sun_and_axes()
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    e = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])
    xyz = sun[:, None] + M @ (e * np.asarray(dist_kpc)[None, :])
    return xyz[0], xyz[1], xyz[2]


@lru_cache(maxsize=1)
def _vcirc_table():
    from galpy.potential import MWPotential2014, vcirc

    R = np.linspace(0.05, 80.0, 320)
    v = np.asarray(vcirc(MWPotential2014, R / RO_KPC)) * VO_KMS
    return R, v


def circular_velocity(R_kpc):
    """Circular velocity (km/s) of galpy's MWPotential2014 scaled to ro = 8 kpc, vo = 220 km/s."""
    R, v = _vcirc_table()
    return np.interp(np.asarray(R_kpc, float), R, v)


# --------------------------------------------------------------------------------------------
# Isochrone-like stellar parameters
# --------------------------------------------------------------------------------------------

PHASES = ("ms", "sgb", "rgb", "rc")
_T_SGB, _T_RGB, _T_RC = 0.07, 0.06, 0.02  # phase durations in units of the main-sequence life


def ms_lifetime(mass, feh):
    """Main-sequence lifetime (Gyr): ``10 m**-2.5 10**(0.08 [Fe/H])``."""
    return 10.0 * np.asarray(mass) ** -2.5 * 10 ** (0.08 * np.asarray(feh))


def sample_evolution(age, feh, rng, m_min=0.55, m_max=3.0, imf_slope=2.3):
    """Draw masses from a power-law IMF and place each star on its track at the given age.

    Returns ``(mass, phase, u)``: phase index into :data:`PHASES` (``-1`` for dead stars) and
    ``u`` in [0, 1], the fractional position within the phase.
    """
    n = len(age)
    a = 1.0 - imf_slope
    x = rng.random(n)
    if abs(a) < 1e-9:  # slope 1: uniform in log mass
        mass = m_min * (m_max / m_min) ** x
    else:
        mass = (m_min**a + x * (m_max**a - m_min**a)) ** (1.0 / a)
    t_ms = ms_lifetime(mass, feh)
    tau = age / t_ms
    edges = np.cumsum([1.0, _T_SGB, _T_RGB, _T_RC])
    phase = np.searchsorted(edges, tau, side="right")
    starts = np.concatenate([[0.0], edges])
    widths = np.array([1.0, _T_SGB, _T_RGB, _T_RC, 1.0])
    u = np.clip((tau - starts[phase]) / widths[phase], 0.0, 1.0)
    phase = np.where(phase > 3, -1, phase)
    return mass, phase, u


def _bc_g(teff):
    """Bolometric correction to Gaia G (Andrae et al. 2018 polynomials)."""
    t = np.asarray(teff, float) - 5772.0
    hot = 6.000e-02 + t * (6.731e-05 + t * (-6.647e-08 + t * (2.859e-11 + t * -7.197e-15)))
    cool = 1.749 + t * (1.977e-03 + t * (3.737e-07 + t * (-8.966e-11 + t * -4.183e-14)))
    return np.where(teff >= 4000.0, hot, cool)


def bp_rp0(teff):
    """Intrinsic Gaia BP-RP colour from teff (a linear fit in theta = 5040/teff)."""
    return -0.70 + 1.80 * 5040.0 / np.asarray(teff, float)


def track(mass, phase, u, age, feh):
    """Analytic isochrone-like track: ``(teff [K], logg [dex], M_G [mag])`` per star.

    Main sequence: ``teff = 5600 m**0.7 10**(-0.03 [Fe/H])`` rising slightly and, for
    ``m > 0.85``, cooling towards the turn-off; radius ``0.9 m**0.8 (1 + 0.6 f**2)`` with ``f`` the
    fraction of the main-sequence life. Subgiants cross at nearly constant logg to the base of the
    giant branch; the red giant branch follows
    ``teff = 4650 + 280 (logg - 2.5) - 230 [Fe/H] + 150 (m - 1)`` from logg 3.6 to 0.8; the red
    clump sits at logg ~ 2.45, teff ~ 4750 K (hotter when metal-poor). Luminosity from
    ``L = m g_sun/g (teff/5772)**4``, ``M_G = 4.74 - 2.5 log L - BC_G(teff)``.
    """
    mass = np.asarray(mass, float)
    phase = np.asarray(phase)
    u = np.asarray(u, float)
    feh = np.asarray(feh, float)
    metal = 10 ** (-0.03 * feh)
    t_ms = ms_lifetime(mass, feh)
    f = np.clip(age / t_ms, 0.0, 1.0)
    s_m = np.clip((mass - 0.85) / 0.4, 0.0, 1.0)

    teff_zams = 5600.0 * mass**0.7 * metal
    teff_ms = teff_zams * (1.0 + 0.03 * f) * (1.0 - 0.07 * f**3 * s_m)
    radius = 0.9 * mass**0.8 * (1.0 + 0.6 * f**2)
    logg_ms = 4.438 + np.log10(mass) - 2.0 * np.log10(radius) + 0.04 * np.clip(-feh, 0, None)

    # turn-off values (f = 1)
    teff_to = teff_zams * 1.03 * (1.0 - 0.07 * s_m)
    logg_to = 4.438 + np.log10(mass) - 2.0 * np.log10(0.9 * mass**0.8 * 1.6)
    feh_w = np.where(feh < 0, 230.0, 150.0) * feh

    def rgb_teff(logg):
        return 4650.0 + 280.0 * (logg - 2.5) - feh_w + 150.0 * (mass - 1.0)

    logg_base = 3.6
    teff_base = rgb_teff(logg_base)
    teff_sgb = teff_to + (teff_base - teff_to) * u
    logg_sgb = logg_to + (logg_base - logg_to) * u**2

    logg_rgb = logg_base - 2.8 * u**2.5
    teff_rgb = rgb_teff(logg_rgb)

    logg_rc = 2.45 + 0.25 * np.log10(mass) + 0.08 * (u - 0.5)
    teff_rc = 4750.0 - 0.9 * feh_w + 120.0 * (mass - 1.2) + 250.0 * np.clip(-0.8 - feh, 0, None)

    teff = np.select([phase == 0, phase == 1, phase == 2, phase == 3],
                     [teff_ms, teff_sgb, teff_rgb, teff_rc], np.nan)
    logg = np.select([phase == 0, phase == 1, phase == 2, phase == 3],
                     [logg_ms, logg_sgb, logg_rgb, logg_rc], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        log_l = np.log10(mass) + 4.438 - logg + 4.0 * np.log10(teff / 5772.0)
        mg = 4.74 - 2.5 * log_l - _bc_g(teff)
    return teff, logg, mg


def vmic_relation(teff, logg):
    """Microturbulence (km/s), GALAH DR2-like (Buder et al. 2018 sect. 4) with a giant-branch rise."""
    teff = np.asarray(teff, float)
    logg = np.asarray(logg, float)
    dt = teff - 5500.0
    dwarf_hot = 1.1 + 1.6e-4 * dt
    other = 1.1 + 1.0e-4 * dt + 4.0e-7 * dt**2
    v = np.where((logg > 4.2) & (teff > 5500.0), dwarf_hot, other)
    v = v + 0.15 * np.clip(3.0 - logg, 0.0, None)
    return np.clip(v, 0.5, 3.0)


def photometry(teff, mg, distance_kpc, ebv):
    """Apparent Gaia G and Johnson V with extinction (A_V = 3.1 E(B-V), A_G = 2.67 E(B-V))."""
    x = bp_rp0(teff)
    dm = 5.0 * np.log10(np.asarray(distance_kpc) * 100.0)
    g = mg + dm + 2.67 * ebv
    v_minus_g = 0.01760 + 0.006860 * x + 0.1732 * x**2  # Evans et al. 2018 (G - V)
    v = g + v_minus_g + (3.1 - 2.67) * ebv
    return g, v


def extinction_ebv(x, y, z, n_steps=24):
    """E(B-V) (mag) by integrating a double-exponential dust layer from the Sun to (x, y, z) kpc.

    Dust density ``k exp(-(R - R_sun)/3 kpc - |z|/0.12 kpc)`` with ``k = 0.35`` mag/kpc.
    """
    sun, _ = _sun_and_axes()
    x, y, z = (np.asarray(a, float) for a in (x, y, z))
    d = np.sqrt((x - sun[0]) ** 2 + (y - sun[1]) ** 2 + (z - sun[2]) ** 2)
    s = (np.arange(n_steps) + 0.5) / n_steps
    xs = sun[0] + (x - sun[0])[:, None] * s
    ys = sun[1] + (y - sun[1])[:, None] * s
    zs = sun[2] + (z - sun[2])[:, None] * s
    return d * _dust_density(np.hypot(xs, ys), zs).mean(axis=1)


# --------------------------------------------------------------------------------------------
# Visibility grid: the number of stars of each component brighter than a limit, per sky region
# --------------------------------------------------------------------------------------------

#: Sky regions for the pre-selection: the LAMOST side (dec > -10 deg, deep) and the GALAH-only
#: south (dec < -10 deg, bright). ``g_lim`` is the pre-selection G limit, with a margin.
REGIONS = (("north", -10.0, 90.0, 17.3), ("south", -90.0, -10.0, 14.3))

_STEP_DEG = 2.0
_D_EDGES = np.geomspace(0.01, 70.0, 111)


@dataclass
class VisibilityGrid:
    """Cells (direction x distance shell) of one sky region sorted by their effective distance
    modulus ``mu = 5 log10(d / 10 pc) + A_G``, with cumulative expected counts per component.

    A star of absolute magnitude ``M`` is visible in the cells with ``mu < g_lim - M``; the number
    of a component's stars in those cells is ``cum[c][searchsorted(mu, g_lim - M)]``.
    """

    mu: np.ndarray            # (n_cells,) sorted
    cell_dir: np.ndarray      # (n_cells,) direction index
    cell_dist: np.ndarray     # (n_cells,) distance shell index
    cum: dict                 # component name -> (n_cells + 1,) cumulative counts, 0 first
    ra_edges: np.ndarray
    dec_edges: np.ndarray
    d_edges: np.ndarray


@lru_cache(maxsize=1)
def visibility_grids() -> dict[str, VisibilityGrid]:
    """Build (once per process) the sorted cell grids of every region."""
    ra_edges = np.arange(0.0, 360.0 + 1e-9, _STEP_DEG)
    dec_edges = np.arange(-90.0, 90.0 + 1e-9, _STEP_DEG)
    ra_c = 0.5 * (ra_edges[1:] + ra_edges[:-1])
    dec_c = 0.5 * (dec_edges[1:] + dec_edges[:-1])
    RA, DEC = np.meshgrid(ra_c, dec_c, indexing="xy")  # (n_dec, n_ra)
    ra_f, dec_f = RA.ravel(), DEC.ravel()
    sdec = np.sin(np.radians(dec_edges))
    omega = np.repeat(np.radians(_STEP_DEG) * (sdec[1:] - sdec[:-1]), len(ra_c))
    d_edges = _D_EDGES
    d_mid = np.sqrt(d_edges[1:] * d_edges[:-1])
    shell = (d_edges[1:] ** 3 - d_edges[:-1] ** 3) / 3.0
    n_dir, n_d = len(ra_f), len(d_mid)
    # Galactocentric positions of the shell centres, (n_d, n_dir)
    x, y, z = icrs_to_galactocentric_xyz(np.tile(ra_f, n_d), np.tile(dec_f, n_d),
                                         np.repeat(d_mid, n_dir))
    x, y, z = (a.reshape(n_d, n_dir) for a in (x, y, z))
    R = np.hypot(x, y)
    # cumulative extinction along each ray up to the shell's outer edge
    dust = _dust_density(R, z)
    ebv = np.cumsum(dust * np.diff(d_edges)[:, None], axis=0)
    mu = 5.0 * np.log10(d_mid * 100.0)[:, None] + 2.67 * ebv
    vol = shell[:, None] * omega[None, :]
    dens = {comp.name: density(comp, R, z) * vol for comp in components()}
    grids = {}
    for name, dlo, dhi, _ in REGIONS:
        dmask = (dec_f > dlo) & (dec_f < dhi)
        dirs = np.flatnonzero(dmask)
        mu_r = mu[:, dirs].ravel()
        order = np.argsort(mu_r, kind="stable")
        cell_dist = np.repeat(np.arange(n_d), len(dirs))[order]
        cell_dir = np.tile(dirs, n_d)[order]
        cum = {c: np.concatenate([[0.0], np.cumsum(w[:, dirs].ravel()[order])])
               for c, w in dens.items()}
        grids[name] = VisibilityGrid(mu_r[order], cell_dir, cell_dist, cum, ra_edges, dec_edges,
                                     d_edges)
    return grids


def _dust_density(R, z):
    """Dust (E(B-V) per kpc): ``0.35 exp(-(R - R_sun)/3 kpc - |z|/0.12 kpc)``, R floored at 2 kpc."""
    return 0.35 * np.exp(-(np.maximum(R, 2.0) - R_SUN_KPC) / 3.0 - np.abs(z) / 0.12)


def _visible_count(grid: VisibilityGrid, comp_name, mu_lim):
    """Expected number of the component's stars in cells with ``mu < mu_lim``."""
    k = np.searchsorted(grid.mu, mu_lim, side="left")
    return grid.cum[comp_name][k]


def _place(grid: VisibilityGrid, comp_name, mu_lim, rng):
    """Draw (ra, dec, distance) for stars of one component, each in a cell with mu < mu_lim."""
    n = len(mu_lim)
    cum = grid.cum[comp_name]
    total = _visible_count(grid, comp_name, mu_lim)
    cell = np.searchsorted(cum, rng.random(n) * total, side="right") - 1
    cell = np.clip(cell, 0, len(grid.mu) - 1)
    k = grid.cell_dist[cell]
    j = grid.cell_dir[cell]
    edges = grid.d_edges
    dist = np.cbrt(edges[k] ** 3 + rng.random(n) * (edges[k + 1] ** 3 - edges[k] ** 3))
    n_ra = len(grid.ra_edges) - 1
    i_dec, i_ra = j // n_ra, j % n_ra
    ra = grid.ra_edges[i_ra] + rng.random(n) * _STEP_DEG
    s0 = np.sin(np.radians(grid.dec_edges[i_dec]))
    s1 = np.sin(np.radians(grid.dec_edges[i_dec + 1]))
    dec = np.degrees(np.arcsin(s0 + rng.random(n) * (s1 - s0)))
    return ra, dec, dist


# --------------------------------------------------------------------------------------------
# Velocities
# --------------------------------------------------------------------------------------------

def draw_velocities(population, age, R, z, rng):
    """Galactocentric cylindrical velocities ``(vR, vT, vz)`` in km/s (vT > 0: with the disk).

    Disks: Gaussian ellipsoid; thin-disk dispersions grow with age as
    ``sigma_R = 40 ((age + 0.15)/10)**0.33``, ``sigma_z = 25 ((age + 0.15)/10)**0.45``,
    ``sigma_T = 0.65 sigma_R``; thick disk (60, 45, 45) km/s; both scaled by
    ``exp(-(R - R_sun)/(2 h_R))`` clipped to [0.5, 1.6]. Mean rotation ``v_c(R)`` minus the asymmetric drift
    ``sigma_R**2/(2 v_c) (sigma_T**2/sigma_R**2 - 1 + R/h_R + R/(2 h_R))``.
    Haloes: spherical Gaussian ellipsoid; in situ (110, 85, 85) km/s with mean 60 km/s rotation,
    accreted (165, 75, 70) km/s with mean 10 km/s (anisotropy beta ~ 0.8, Gaia-Enceladus-like).
    """
    n = len(population)
    vR = np.empty(n)
    vT = np.empty(n)
    vz = np.empty(n)
    vc = circular_velocity(R)
    for pop in np.unique(population):
        m = population == pop
        k = int(m.sum())
        if pop in ("thin", "thick"):
            if pop == "thin":
                t = (age[m] + 0.15) / 10.0
                sR, sz, hR = 40.0 * t**0.33, 25.0 * t**0.45, 2.6
                sT = 0.65 * sR
            else:
                sR, sT, sz, hR = np.full(k, 60.0), np.full(k, 45.0), np.full(k, 45.0), 2.0
            fall = np.clip(np.exp(-(R[m] - R_SUN_KPC) / (2.0 * hR)), 0.5, 1.6)
            sR, sT, sz = sR * fall, sT * fall, sz * fall
            Rm = np.clip(R[m], 2.0, None)
            drift = sR**2 / (2.0 * vc[m]) * ((sT / sR) ** 2 - 1.0 + Rm / hR + Rm / (2.0 * hR))
            mean_T = vc[m] - np.clip(drift, 0.0, 0.8 * vc[m])
            vR[m] = rng.normal(0.0, sR)
            vT[m] = rng.normal(mean_T, sT)
            vz[m] = rng.normal(0.0, sz)
        else:
            if pop == "halo_insitu":
                sr, sth, sph, rot = 110.0, 85.0, 85.0, 60.0
            else:
                sr, sth, sph, rot = 165.0, 75.0, 70.0, 10.0
            vr = rng.normal(0.0, sr, k)
            vth = rng.normal(0.0, sth, k)
            vph = rng.normal(rot, sph, k)
            r = np.hypot(R[m], z[m])
            sin_t, cos_t = R[m] / r, z[m] / r  # theta from +z axis
            vR[m] = vr * sin_t + vth * cos_t
            vz[m] = vr * cos_t - vth * sin_t
            vT[m] = vph
    return vR, vT, vz


def from_observables(ra, dec, dist_kpc, pmra, pmdec, rv):
    """Galactocentric Cartesian position (kpc) and cylindrical velocity (vR, vT, vz; km/s, vT > 0
    with the disk) of ICRS observables: the inverse of :func:`to_observables`."""
    import astropy.units as u
    from astropy.coordinates import ICRS

    c = ICRS(ra=np.asarray(ra) * u.deg, dec=np.asarray(dec) * u.deg,
             distance=np.asarray(dist_kpc) * u.kpc, pm_ra_cosdec=np.asarray(pmra) * u.mas / u.yr,
             pm_dec=np.asarray(pmdec) * u.mas / u.yr,
             radial_velocity=np.asarray(rv) * u.km / u.s).transform_to(galactocentric_frame())
    x, y, z = (c.cartesian.xyz.to_value(u.kpc))
    vx, vy, vz = (c.velocity.d_xyz.to_value(u.km / u.s))
    R = np.hypot(x, y)
    vR = (x * vx + y * vy) / R
    vT = (y * vx - x * vy) / R
    return x, y, z, vR, vT, vz


def to_observables(x, y, z, vR, vT, vz):
    """ICRS (ra, dec [deg], distance [kpc], pmra, pmdec [mas/yr], rv [km/s]) via astropy."""
    import astropy.units as u
    from astropy.coordinates import ICRS, SkyCoord

    R = np.hypot(x, y)
    cphi, sphi = x / R, y / R
    # Rotation with the disk is along t = (y, -x)/R in astropy's frame (the Sun moves to +y).
    vx = vR * cphi + vT * sphi
    vy = vR * sphi - vT * cphi
    c = SkyCoord(x=x * u.kpc, y=y * u.kpc, z=z * u.kpc,
                 v_x=vx * u.km / u.s, v_y=vy * u.km / u.s, v_z=vz * u.km / u.s,
                 frame=galactocentric_frame()).transform_to(ICRS())
    return (c.ra.to_value(u.deg), c.dec.to_value(u.deg), c.distance.to_value(u.kpc),
            c.pm_ra_cosdec.to_value(u.mas / u.yr), c.pm_dec.to_value(u.mas / u.yr),
            c.radial_velocity.to_value(u.km / u.s))


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------

#: Mass proposal of the pool (flatter than the IMF; the IMF enters as a weight) and the scale
#: that turns weights into expected numbers of copies (see :func:`_draw_pool`).
_M_MIN, _M_MAX, _IMF_SLOPE, _PROPOSAL_SLOPE = 0.58, 2.5, 2.3, 1.0
_SPLIT_SCALE = 0.05


def _draw_pool(n, rng):
    """Intrinsic stars -> visible stars with positions (importance sampling with splitting).

    The target density of a star of component ``c`` and absolute magnitude ``M`` is
    ``phi_c(age, mass, phase) V_c(M)``, with ``V_c(M)`` the number of the component's stars inside
    the distance where it reaches the survey limit. The pool draws ``c`` with probability
    proportional to ``V_c(max)`` and masses from a flatter power law than the IMF; each pool star
    then yields a Poisson-like number of visible stars (``floor(k) + Bernoulli(k - floor(k))``)
    with mean ``k`` proportional to ``IMF(m)/proposal(m) x V_c(M)/V_c(max)``, each copy placed and
    given its chemistry independently. The result is unbiased and ~20x cheaper than rejection.
    """
    from . import chemistry

    grids = visibility_grids()
    comps = components()
    vmax = np.array([sum(grids[r[0]].cum[c.name][-1] for r in REGIONS) for c in comps])
    ci = rng.choice(len(comps), size=n, p=vmax / vmax.sum())
    age = np.empty(n)
    for i, c in enumerate(comps):
        m = ci == i
        age[m] = rng.uniform(c.age_range[0], c.age_range[1], int(m.sum()))
    pop = np.array([c.population for c in comps])[ci]
    feh0 = chemistry.provisional_feh(pop, age, rng)
    mass, phase, u = sample_evolution(age, feh0, rng, m_min=_M_MIN, m_max=_M_MAX,
                                      imf_slope=_PROPOSAL_SLOPE)
    weight = mass ** (_PROPOSAL_SLOPE - _IMF_SLOPE)
    teff, logg, mg = track(mass, phase, u, age, feh0)
    ok = (phase >= 0) & (teff > TEFF_RANGE[0] - 300) & (teff < TEFF_RANGE[1] + 300)
    vis = np.zeros((len(REGIONS), n))
    for j, (name, _, _, glim) in enumerate(REGIONS):
        for i, c in enumerate(comps):
            m = (ci == i) & ok
            vis[j, m] = _visible_count(grids[name], c.name, glim - mg[m])
    k = np.where(ok, weight * vis.sum(axis=0) / vmax[ci] / _SPLIT_SCALE, 0.0)
    copies = np.floor(k).astype(np.int64) + (rng.random(n) < k - np.floor(k))
    idx = np.repeat(np.arange(n), copies)
    idx = idx[rng.permutation(len(idx))]
    # region choice proportional to its visible count, then position
    region = (rng.random(len(idx)) * vis[:, idx].sum(axis=0) > vis[0, idx]).astype(int)
    ra = np.empty(len(idx))
    dec = np.empty(len(idx))
    dist = np.empty(len(idx))
    for j, (name, _, _, glim) in enumerate(REGIONS):
        for i, c in enumerate(comps):
            m = (region == j) & (ci[idx] == i)
            if not m.any():
                continue
            ra[m], dec[m], dist[m] = _place(grids[name], c.name, glim - mg[idx][m], rng)
    return pd.DataFrame({
        "component": np.array([c.name for c in comps])[ci[idx]],
        "population": pop[idx], "age": age[idx], "mass": mass[idx],
        "phase_index": phase[idx], "phase_u": u[idx], "feh_provisional": feh0[idx],
        "ra": ra, "dec": dec, "distance": dist,
    })


def finish_stars(df: pd.DataFrame, rng, *, kinematics: bool = True) -> pd.DataFrame:
    """Given positions and intrinsic parameters, add chemistry, final stellar parameters,
    extinction, photometry and (optionally) kinematics; returns a new DataFrame."""
    from . import chemistry

    df = df.copy()
    x, y, z = icrs_to_galactocentric_xyz(df["ra"].to_numpy(), df["dec"].to_numpy(),
                                         df["distance"].to_numpy())
    R = np.hypot(x, y)
    df["x"], df["y"], df["z"] = x, y, z
    df["R"] = R
    df["phi"] = np.degrees(np.arctan2(y, -x))  # 0 at the Sun, increasing with rotation
    pop = df["population"].to_numpy()
    age = df["age"].to_numpy()
    abund = chemistry.abundances(pop, age, R, z, rng)
    for k, v in abund.items():
        df[k] = v
    teff, logg, mg = track(df["mass"].to_numpy(), df["phase_index"].to_numpy(),
                           df["phase_u"].to_numpy(), age, df["fe_h"].to_numpy())
    # intrinsic scatter about the tracks (rotation, mixing length, helium, ...); wider in the clump
    rc = df["phase_index"].to_numpy() == 3
    teff = teff + rng.normal(0.0, 35.0, len(df))
    logg = logg + rng.normal(0.0, np.where(rc, 0.07, 0.035))
    df["teff"], df["logg"], df["abs_g"] = teff, logg, mg
    df["vmic"] = vmic_relation(teff, logg) + rng.normal(0.0, 0.05, len(df))
    df["phase"] = np.array(PHASES)[np.clip(df["phase_index"].to_numpy(), 0, 3)]
    ebv = extinction_ebv(x, y, z)
    df["ebv"] = ebv
    g, v = photometry(teff, mg, df["distance"].to_numpy(), ebv)
    df["phot_g_mean_mag"], df["vmag"] = g, v
    df["bp_rp"] = bp_rp0(teff) + 1.34 * ebv
    if kinematics:
        df = add_kinematics(df, rng)
    return df


def add_kinematics(df: pd.DataFrame, rng) -> pd.DataFrame:
    """Draw Galactocentric velocities and convert them to proper motions and radial velocities."""
    x, y, z = (df[c].to_numpy() for c in ("x", "y", "z"))
    R = np.hypot(x, y)
    vR, vT, vz = draw_velocities(df["population"].to_numpy(), df["age"].to_numpy(), R, z, rng)
    df["vR"], df["vT"], df["vz"] = vR, vT, vz
    _, _, _, pmra, pmdec, rv = to_observables(x, y, z, vR, vT, vz)
    df["pmra"], df["pmdec"], df["rv"] = pmra, pmdec, rv
    return df


def sample_stars(n_pool: int, rng) -> pd.DataFrame:
    """One chunk of the mock Galaxy as a magnitude-limited survey sees it.

    Draws ``n_pool`` intrinsic stars, keeps those visible (see the module docstring) and returns
    a DataFrame with population, age, mass, phase, chemistry (``fe_h``, ``<x>_fe``), ``teff``,
    ``logg``, ``vmic``, position (``ra``, ``dec`` deg, ``distance`` kpc; Galactocentric ``x, y, z,
    R, phi``), velocities (``vR, vT, vz`` km/s; ``pmra, pmdec`` mas/yr; ``rv`` km/s), extinction
    ``ebv`` and photometry (``abs_g``, ``phot_g_mean_mag``, ``vmag``, ``bp_rp``). Stars outside
    :data:`TEFF_RANGE` or fainter than both surveys' limits (north of dec -10: G < 17; everywhere:
    V < 14) are removed.
    """
    df = finish_stars(_draw_pool(n_pool, rng), rng, kinematics=False)
    north = df["dec"].to_numpy() > -10.0
    g = df["phot_g_mean_mag"].to_numpy()
    v = df["vmag"].to_numpy()
    teff = df["teff"].to_numpy()
    keep = (((north & (g < 17.0)) | (v < 14.0)) & (g > 8.5)
            & (teff >= TEFF_RANGE[0]) & (teff <= TEFF_RANGE[1]) & np.isfinite(df["logg"].to_numpy()))
    df = df.loc[keep].reset_index(drop=True)
    return add_kinematics(df, rng)
