"""Galactocentric positions, velocities and actions (paper section 5.1 and Table 1).

The paper computes, for every catalogue star, Galactocentric cylindrical coordinates and the
actions ``(J_R, J_phi, J_z)`` with *galpy* (Bovy 2015) using the Staeckel fudge (Binney 2012;
Bovy & Rix 2013) in ``MWPotential2014``, from Gaia DR2 positions, proper motions and
Bailer-Jones et al. (2018) distances, and LAMOST radial velocities.

Solar parameters (Wheeler et al. 2020, section 5.1)
---------------------------------------------------
* Sun at ``R0 = 8 kpc`` from the Galactic centre and ``z0 = 0.025 kpc`` above the plane
  (Juric et al. 2008).
* Solar velocity relative to the Galactic centre ``(U, V, W) = (11.1, 232.24, 7.25) km/s``
  (Schoenrich, Binney & Dehnen 2010 peculiar motion ``(11.1, 12.24, 7.25)`` on top of a circular
  velocity ``v0 = 220 km/s``), with U towards the Galactic centre, V in the direction of Galactic
  rotation and W towards the North Galactic Pole.

In galpy this is ``ro=8, zo=0.025, vo=220, solarmotion=[-11.1, 12.24, 7.25]``: galpy's
``solarmotion`` is ``[-U, V, W]`` *relative to the local standard of rest* and ``vo`` is added to
V. (Passing 232.24 as the second component would give the Sun 452 km/s.) The equivalent
astropy frame is ``Galactocentric(galcen_distance=sqrt(8**2 + 0.025**2) kpc, z_sun=25 pc,
galcen_v_sun=(11.1, 232.24, 7.25) km/s, roll=0)``; the tests check that both agree.

Sign conventions of the returned columns (right-handed, as the paper's Table 1 states)
--------------------------------------------------------------------------------------
* ``X, Y, z`` [kpc]: right-handed Cartesian frame centred on the Galactic centre. ``X`` points
  from the Galactic centre towards the Sun (the Sun is at ``X = +8``, ``Y = 0``, ``z = +0.025``),
  ``z`` points to the North Galactic Pole and ``Y = z x X`` points towards Galactic longitude
  ``l = 270 deg`` (away from the direction of rotation). In this frame the Sun moves with
  ``(v_X, v_Y, v_z) = (-11.1, -232.24, +7.25) km/s`` (the paper quotes ``v_X = +11.1``, the
  heliocentric U; the Sun moves *towards* the centre, so ``v_X`` and ``vR`` are negative).
  This frame is astropy's ``Galactocentric`` rotated by 180 deg about ``z``.
* ``R = sqrt(X^2 + Y^2)``, ``phi = atan2(Y, X)`` [rad] in ``(-pi, pi]``; the Sun is at
  ``phi = 0``. ``vR = dR/dt``, ``vT = R dphi/dt``, ``vz = dz/dt`` [km/s].
  **Galactic rotation is clockwise seen from the North Galactic Pole, so in this right-handed
  frame disk stars have ``vT < 0``** (the Sun has ``vT = -232.24 km/s``) and ``phi`` decreases
  along their orbits. ``R, z, vR, vT, vz`` equal astropy's Galactocentric cylindrical values
  exactly; ``phi`` differs from astropy's by ``pi``.
* ``vphi = -vT`` [km/s]: the azimuthal velocity counted positive in the direction of Galactic
  rotation (galpy's ``vT``). The paper's figures use this sign ("disk stars are prograde with
  ``v_phi >~ 100 km/s``"); use ``vphi`` for Figs 12-14.
* ``JR, Jz >= 0`` [kpc km/s]; ``Jphi = R vT = L_z`` [kpc km/s] in the same right-handed frame, so
  **prograde (disk) stars have ``Jphi < 0``**; galpy's ``J_phi`` (and the paper's
  "``J_phi ~ 1500 kpc km/s``" disk/halo cut) is ``-Jphi``.

Flags (column ``kin_flag``, a bitmask; 0 = all good)
-----------------------------------------------------
``FLAG_BAD_POSITION`` (1): ra, dec or distance missing, or distance <= 0: every column NaN.
``FLAG_BAD_VELOCITY`` (2): pmra, pmdec or rv missing: velocities and actions NaN.
``FLAG_UNBOUND`` (4): energy ``E >= 0`` in MWPotential2014: actions NaN.
``FLAG_ACTION_FAILED`` (8): the Staeckel fudge returned non-finite or negative actions: NaN.
No input row raises; the function never drops rows, so the output aligns with the input.
"""

from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger(__name__)

#: Distance of the Sun from the Galactic centre, projected on the plane [kpc] (paper 5.1).
R0_KPC = 8.0
#: Height of the Sun above the Galactic plane [kpc] (Juric et al. 2008).
Z0_KPC = 0.025
#: Circular velocity at R0 in galpy's natural units [km/s] (MWPotential2014 is scaled to it).
V0_KMS = 220.0
#: Solar velocity relative to the Galactic centre, (U towards GC, V rotation, W to NGP) [km/s].
V_SUN_KMS = (11.1, 232.24, 7.25)
#: galpy ``solarmotion``: ``[-U, V - vo, W]`` relative to the LSR [km/s].
GALPY_SOLARMOTION = (-V_SUN_KMS[0], V_SUN_KMS[1] - V0_KMS, V_SUN_KMS[2])
#: Focal distance of the prolate spheroidal coordinates of the Staeckel fudge [in units of R0].
STAECKEL_DELTA = 0.4

FLAG_BAD_POSITION = 1
FLAG_BAD_VELOCITY = 2
FLAG_UNBOUND = 4
FLAG_ACTION_FAILED = 8

#: Columns of :func:`galactocentric` (and :func:`kinematics` without the actions).
PHASE_SPACE_COLUMNS = ("X", "Y", "R", "phi", "z", "vR", "vT", "vz", "vphi")
ACTION_COLUMNS = ("JR", "Jphi", "Jz")
UNITS = {"X": "kpc", "Y": "kpc", "R": "kpc", "phi": "rad", "z": "kpc", "vR": "km/s",
         "vT": "km/s", "vz": "km/s", "vphi": "km/s", "E": "km2/s2", "JR": "kpc km/s",
         "Jphi": "kpc km/s", "Jz": "kpc km/s", "kin_flag": ""}

_ACTION_ANGLE = None


def galpy_frame_kwargs() -> dict:
    """The galpy ``Orbit`` keywords of the paper's solar parameters (``radec=True``)."""
    return dict(radec=True, ro=R0_KPC, zo=Z0_KPC, vo=V0_KMS, solarmotion=list(GALPY_SOLARMOTION))


def astropy_frame():
    """The equivalent :class:`astropy.coordinates.Galactocentric` frame (for cross-checks).

    Note that astropy's ``x`` axis points from the Sun to the Galactic centre (the Sun is at
    ``x = -8 kpc``) and its ``y`` axis towards ``l = 90 deg``: ``X = -x``, ``Y = -y`` here.
    """
    import astropy.coordinates as coord
    import astropy.units as u

    return coord.Galactocentric(
        galcen_distance=np.hypot(R0_KPC, Z0_KPC) * u.kpc,
        z_sun=Z0_KPC * 1000 * u.pc,
        galcen_v_sun=list(V_SUN_KMS) * (u.km / u.s),
        roll=0 * u.deg,
    )


def action_angle():
    """The (cached) ``actionAngleStaeckel(pot=MWPotential2014, delta=0.4, c=True)`` instance."""
    global _ACTION_ANGLE
    if _ACTION_ANGLE is None:
        from galpy.actionAngle import actionAngleStaeckel
        from galpy.potential import MWPotential2014

        _ACTION_ANGLE = actionAngleStaeckel(pot=MWPotential2014, delta=STAECKEL_DELTA, c=True)
    return _ACTION_ANGLE


def distance_from_r_est(r_est_pc):
    """Bailer-Jones et al. (2018) ``r_est`` [pc] -> distance [kpc]; non-positive -> NaN."""
    d = np.asarray(r_est_pc, dtype=float) / 1000.0
    with np.errstate(invalid="ignore"):
        return np.where(d > 0, d, np.nan)


def _as_1d(name, value, n=None):
    arr = np.atleast_1d(np.asarray(value, dtype=float))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries, expected {n} like ra")
    return arr


def _phase_space_chunk(ra, dec, dist, pmra, pmdec, rv):
    """galpy path for one chunk; returns dict of arrays in the right-handed convention."""
    from galpy.orbit import Orbit

    n = ra.size
    out = {k: np.full(n, np.nan) for k in PHASE_SPACE_COLUMNS}
    flag = np.zeros(n, dtype=np.int16)
    with np.errstate(invalid="ignore"):
        pos_ok = np.isfinite(ra) & np.isfinite(dec) & np.isfinite(dist) & (dist > 0)
    vel_ok = pos_ok & np.isfinite(pmra) & np.isfinite(pmdec) & np.isfinite(rv)
    flag[~pos_ok] |= FLAG_BAD_POSITION
    flag[pos_ok & ~vel_ok] |= FLAG_BAD_VELOCITY
    if not pos_ok.any():
        return out, flag
    idx = np.flatnonzero(pos_ok)
    # galpy needs finite velocities to set up the orbit; use 0 where missing and blank them after.
    vxvv = np.column_stack([ra[idx], dec[idx], dist[idx],
                            np.where(vel_ok[idx], pmra[idx], 0.0),
                            np.where(vel_ok[idx], pmdec[idx], 0.0),
                            np.where(vel_ok[idx], rv[idx], 0.0)])
    o = Orbit(vxvv, **galpy_frame_kwargs())
    # galpy's frame is left-handed (x to the Sun, y along rotation): flip y, phi and vT.
    out["X"][idx] = o.x()
    out["Y"][idx] = -o.y()
    out["R"][idx] = o.R()
    out["phi"][idx] = -o.phi()
    out["z"][idx] = o.z()
    bad_v = ~vel_ok[idx]
    for col, values in (("vR", o.vR()), ("vT", -o.vT()), ("vz", o.vz())):
        values = np.asarray(values, dtype=float).copy()
        values[bad_v] = np.nan
        out[col][idx] = values
    out["vphi"] = -out["vT"]
    # galpy returns phi in [0, 2pi); map to (-pi, pi].
    phi = out["phi"]
    with np.errstate(invalid="ignore"):
        out["phi"] = np.where(phi <= -np.pi, phi + 2 * np.pi, phi)
    return out, flag


def energy(R, z, vR, vT, vz):
    """Specific orbital energy in MWPotential2014 [km^2/s^2] (zero at infinity).

    Inputs in kpc and km/s (the sign of ``vT`` does not matter).
    """
    from galpy.potential import evaluatePotentials, MWPotential2014

    R, z = np.asarray(R, float), np.asarray(z, float)
    ok = np.isfinite(R) & np.isfinite(z) & (R > 0)
    pot = np.full(R.shape, np.nan)
    if ok.any():
        pot[ok] = evaluatePotentials(MWPotential2014, R[ok] / R0_KPC, z[ok] / R0_KPC) * V0_KMS**2
    return pot + 0.5 * (np.asarray(vR) ** 2 + np.asarray(vT) ** 2 + np.asarray(vz) ** 2)


def actions(R, z, vR, vT, vz):
    """Staeckel-fudge actions in MWPotential2014 (``delta = 0.4``), right-handed ``Jphi``.

    Parameters
    ----------
    R, z : array (S,) [kpc]
    vR, vT, vz : array (S,) [km/s], ``vT`` in the right-handed convention of this module
        (negative for disk stars).

    Returns
    -------
    JR, Jphi, Jz, flag : arrays (S,); actions in kpc km/s with ``Jphi = R vT``; NaN (and the
        ``FLAG_UNBOUND``/``FLAG_ACTION_FAILED``/``FLAG_BAD_VELOCITY`` bit) where not computed.
    """
    R, z, vR, vT, vz = (np.atleast_1d(np.asarray(a, dtype=float)) for a in (R, z, vR, vT, vz))
    n = R.size
    JR, Jphi, Jz = (np.full(n, np.nan) for _ in range(3))
    flag = np.zeros(n, dtype=np.int16)
    finite = np.isfinite(R) & np.isfinite(z) & np.isfinite(vR) & np.isfinite(vT) & np.isfinite(vz)
    with np.errstate(invalid="ignore"):
        finite &= R > 0
    flag[~finite] |= FLAG_BAD_VELOCITY
    E = np.full(n, np.nan)
    E[finite] = energy(R[finite], z[finite], vR[finite], vT[finite], vz[finite])
    with np.errstate(invalid="ignore"):
        bound = finite & (E < 0)
    flag[finite & ~bound] |= FLAG_UNBOUND
    if bound.any():
        ro, vo = R0_KPC, V0_KMS
        # galpy's left-handed vT is minus ours.
        jr, jp, jz = action_angle()(R[bound] / ro, vR[bound] / vo, -vT[bound] / vo,
                                    z[bound] / ro, vz[bound] / vo)
        jr, jp, jz = (np.asarray(a, dtype=float) * ro * vo for a in (jr, jp, jz))
        with np.errstate(invalid="ignore"):
            good = np.isfinite(jr) & np.isfinite(jz) & np.isfinite(jp) & (jr >= 0) & (jz >= 0)
        ib = np.flatnonzero(bound)
        JR[ib[good]] = jr[good]
        Jz[ib[good]] = jz[good]
        Jphi[ib[good]] = -jp[good]
        flag[ib[~good]] |= FLAG_ACTION_FAILED
    return JR, Jphi, Jz, flag


#: Fewest stars for which :func:`kinematics` may use worker processes by default (only when
#: galpy runs on one OpenMP thread). A spawned worker pays 1.5-2 s of CPU importing galpy
#: (``galpy.potential``) before its first star, and a star costs ~0.07 ms of CPU: from 200,000
#: stars on, the start-up is below ~15% of a worker's share on two cores.
PARALLEL_MIN_STARS = 200_000
#: Smallest chunk handed to a worker process (a chunk costs ~0.1 ms per star plus ~0.1 s).
PARALLEL_MIN_CHUNK = 2_000


def _chunk(ra, dec, dist, pmra, pmdec, rv, with_actions, with_energy):
    """Every column of :func:`kinematics` for one chunk: ``({column: array}, flag)``."""
    ps, flag = _phase_space_chunk(ra, dec, dist, pmra, pmdec, rv)
    out = dict(ps)
    if with_energy:
        out["E"] = energy(ps["R"], ps["z"], ps["vR"], ps["vT"], ps["vz"])
    if with_actions:
        out["JR"], out["Jphi"], out["Jz"], fa = actions(ps["R"], ps["z"], ps["vR"], ps["vT"],
                                                        ps["vz"])
        # only report action problems for rows whose inputs were fine
        flag = flag | np.where(flag == 0, fa, 0).astype(np.int16)
    return out, flag


def _chunk_payload(payload):
    """Task of a kinematics worker process: :func:`_chunk` of one payload tuple."""
    return _chunk(*payload)


def openmp_threads() -> int:
    """Threads galpy's C extension runs its action loops on (OpenMP), 1 without OpenMP.

    galpy's wheels link OpenMP: ``actionAngleStaeckel(c=True)`` spreads its loops over the
    stars on ``OMP_NUM_THREADS`` threads (default: every core), so one process already uses
    the cores (measured on 2 cores, 60,000 stars: 2.13 s against 4.05 s on one thread; 96% of
    the CPU time in parallel loops). Worker processes help only where it does not (a galpy
    built without OpenMP, or ``OMP_NUM_THREADS=1`` as batch systems often set).
    """
    action_angle()  # loads galpy's C library (and its OpenMP runtime)
    from threadpoolctl import threadpool_info

    omp = [i for i in threadpool_info() if i.get("internal_api") == "openmp"]
    mine = [i for i in omp if "galpy" in str(i.get("filepath", ""))] or omp
    return max((int(i.get("num_threads") or 1) for i in mine), default=1)


def _init_worker() -> None:
    """Worker initializer: galpy's imports and the Staeckel set-up once per process (~1.5 s of
    CPU, almost all importing ``galpy.potential``)."""
    action_angle()
    from galpy.orbit import Orbit  # noqa: F401


def kinematics(ra, dec, distance, pmra, pmdec, rv, *, with_actions=True, with_energy=False,
               chunk_size=None, index=None, n_workers=None):
    """Galactocentric positions, velocities and actions for arrays of stars.

    Parameters
    ----------
    ra, dec : array (S,) [deg], ICRS.
    distance : array (S,) [kpc] (use :func:`distance_from_r_est` for Bailer-Jones ``r_est``).
    pmra : array (S,) [mas/yr], ``mu_alpha* = mu_alpha cos(dec)``.
    pmdec : array (S,) [mas/yr].
    rv : array (S,) [km/s], heliocentric line-of-sight velocity (LAMOST ``rv``).
    with_actions : compute ``JR, Jphi, Jz`` with the Staeckel fudge (~5-10 s per 1e5 stars).
    with_energy : add the energy column ``E`` [km^2/s^2] (MWPotential2014, zero at infinity).
    chunk_size : stars per chunk (bounds the memory of a chunk; progress is logged per chunk).
        Default: 100,000 in one process; with workers, about four chunks per worker (at least
        :data:`PARALLEL_MIN_CHUNK`, at most 100,000).
    index : optional index for the returned DataFrame.
    n_workers : int, optional
        Worker processes for the chunks (:func:`lamostcannon.parallel.ordered_map`: spawned,
        dying with this process; one OpenMP thread each; a chunk whose worker dies twice is
        computed here). Default: 1 (this process, whose galpy already runs its action loops
        on every core through OpenMP, see :func:`openmp_threads`), unless galpy runs on fewer
        threads than the ``LAMOSTCANNON_WORKERS`` setting and there are at least
        :data:`PARALLEL_MIN_STARS` stars: then that many workers. Every star is computed by
        the same code whatever the chunking, so the results equal the one-process path (to
        floating-point tolerance; bit for bit on one machine in practice).

    Returns
    -------
    pandas.DataFrame with S rows, in input order, columns ``X, Y, R, phi, z, vR, vT, vz, vphi``
    [kpc, rad, km/s], then ``JR, Jphi, Jz`` [kpc km/s] (if ``with_actions``), ``E`` (if asked)
    and ``kin_flag`` (bitmask, see the module docstring). Conventions: right-handed frame,
    Sun at ``X = 8``, ``phi = 0``; disk stars have ``vT < 0``, ``vphi > 0`` and ``Jphi < 0``.
    """
    import pandas as pd

    ra = _as_1d("ra", ra)
    n = ra.size
    dec, dist, pmra, pmdec, rv = (_as_1d(name, v, n) for name, v in
                                  (("dec", dec), ("distance", distance), ("pmra", pmra),
                                   ("pmdec", pmdec), ("rv", rv)))
    if n_workers is None:
        n_workers = 1
        if n >= PARALLEL_MIN_STARS:
            from .config import settings

            cores = settings().n_workers
            if openmp_threads() < cores:
                n_workers = cores
    n_workers = int(n_workers)
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    if chunk_size is None:
        chunk_size = (100_000 if n_workers == 1 else
                      min(100_000, max(PARALLEL_MIN_CHUNK, -(-n // (4 * n_workers)))))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    cols = list(PHASE_SPACE_COLUMNS) + (list(ACTION_COLUMNS) if with_actions else [])
    cols += ["E"] if with_energy else []
    result = {c: np.full(n, np.nan) for c in cols}
    flag = np.zeros(n, dtype=np.int16)
    t0 = time.perf_counter()
    slices = [slice(a, min(a + chunk_size, n)) for a in range(0, n, chunk_size)]

    def payload(sl):
        return (ra[sl], dec[sl], dist[sl], pmra[sl], pmdec[sl], rv[sl], with_actions,
                with_energy)

    def keep(sl, cols_flag):
        out, f = cols_flag
        for c in cols:
            result[c][sl] = out[c]
        flag[sl] = f
        log.info("kinematics: %d/%d stars (%.1f s)", sl.stop, n, time.perf_counter() - t0)

    if n_workers == 1 or len(slices) <= 1:
        for sl in slices:
            keep(sl, _chunk(*payload(sl)))
    else:
        from .parallel import ordered_map

        def lost(index, exc):  # the worker died twice on this chunk: compute it here
            log.warning("kinematics: chunk %d failed in a worker (%s); computing it here",
                        index, exc)
            return None

        for k, got in ordered_map(_chunk_payload, (payload(sl) for sl in slices),
                                  n_workers, initializer=_init_worker, on_error=lost,
                                  env={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}):
            keep(slices[k], got if got is not None else _chunk(*payload(slices[k])))
    df = pd.DataFrame(result, index=index)
    df["kin_flag"] = flag
    n_bad = int((flag != 0).sum())
    if n_bad:
        log.info("kinematics: %d of %d stars flagged (%s)", n_bad, n,
                 ", ".join(f"{name}={int(((flag & bit) != 0).sum())}" for name, bit in
                           (("bad_position", FLAG_BAD_POSITION), ("bad_velocity", FLAG_BAD_VELOCITY),
                            ("unbound", FLAG_UNBOUND), ("action_failed", FLAG_ACTION_FAILED))))
    return df


def kinematics_from_table(table, *, ra="ra", dec="dec", r_est="r_est", pmra="pmra",
                          pmdec="pmdec", rv="rv", **kwargs):
    """:func:`kinematics` on a table (pandas DataFrame or astropy Table) by column names.

    The distance is the Bailer-Jones-like column ``r_est`` in **pc**; ``rv`` is the LAMOST
    radial velocity (pass ``rv="radial_velocity"`` for Gaia's). The result's index is the
    DataFrame's index (a plain range for an astropy Table). Other keywords go to
    :func:`kinematics`.
    """
    def col(name):
        try:
            values = table[name]
        except KeyError:
            raise KeyError(f"column {name!r} not found; available: {list(_colnames(table))}") from None
        if hasattr(values, "mask") and hasattr(values, "filled"):  # astropy MaskedColumn
            return np.ma.asarray(values, dtype=float).filled(np.nan)
        return np.asarray(values, dtype=float)

    index = getattr(table, "index", None)
    if index is not None and not hasattr(index, "dtype"):
        index = None  # astropy Table.index is not a pandas index
    return kinematics(col(ra), col(dec), distance_from_r_est(col(r_est)), col(pmra), col(pmdec),
                      col(rv), index=index, **kwargs)


def _colnames(table):
    return getattr(table, "colnames", None) or list(getattr(table, "columns", []))
