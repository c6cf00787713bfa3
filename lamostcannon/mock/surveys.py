"""The mock surveys: who is observed, when, and what the archives report (everything but spectra).

:func:`build_universe` draws the Galaxy (:mod:`.galaxy`) until the LAMOST-like survey has its
quota of stars, adds the wide binaries and the Praesepe-like cluster, and returns a
:class:`Universe` of plain DataFrames:

* ``stars``: one row per star (the truth table), with ids and survey membership;
* ``lamost``: one row per LAMOST observation (plate, spectrograph, fibre, file name, target S/N,
  observed radial velocity, LASP-like labels). ``z`` and ``snru..snrz`` are filled in by the
  spectral generator when the spectra are written (:func:`lamostcannon.mock.generate`);
* ``galah``: the GALAH DR2.1-schema catalogue, with reported (noisy, sometimes wrong) labels;
* ``gaia``, ``distances``, ``binaries``, ``members``: the Gaia DR2, Bailer-Jones, El-Badry and
  Cantat-Gaudin style tables.

Selections (see ``docs/mock_universe.md``): LAMOST observes dec > -10 deg, 9 < G < 17, with a
completeness that is higher for bright stars, towards the Galactic anticentre and in the equatorial
stripe; GALAH observes dec < +10 deg, 12 < V < 14, |b| > 10 deg. Both observe -10 < dec < +10.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..labels import ELEMENTS
from . import chemistry, galaxy

log = logging.getLogger(__name__)

C_KMS = 299792.458


@dataclass(frozen=True)
class SizeSpec:
    """How big a mock universe is."""

    n_lamost_obs: int     # LAMOST observations (target; field stars + binaries + cluster)
    n_binaries: int       # wide-binary pairs in the catalogue
    cluster_scale: float  # membership-table rows of each cluster, relative to ClusterSpec.n_table
    pool_chunk: int       # intrinsic stars per Galaxy-sampling chunk
    spectra_chunk: int    # LAMOST observations per spectra task


SIZES = {
    "tiny": SizeSpec(300, 10, 0.05, 40_000, 100),
    "small": SizeSpec(50_000, 1200, 1.0, 500_000, 1000),
    "large": SizeSpec(500_000, 3000, 1.5, 1_000_000, 2000),
}

#: Fraction of LAMOST stars observed 2+ and 3+ times.
REPEAT_FRACTIONS = (0.10, 0.025)
#: LMJD range of LAMOST DR4 (2011-10 to 2016-06) and GALAH DR2 observing dates.
LMJD_RANGE = (55859, 57570)
GALAH_MJD_RANGE = (56600, 58100)

@dataclass(frozen=True)
class ClusterSpec:
    """An open cluster of the mock (Cantat-Gaudin et al. 2018 name and parameters).

    Centre ``ra``, ``dec`` [deg], ``distance_pc``, ``age`` [Gyr], ``fe_h`` [dex], mean proper
    motion ``pmra``, ``pmdec`` [mas/yr], radial velocity ``rv`` [km/s], ``ebv`` [mag], Plummer
    scale radius ``core_pc`` and ``n_table``, the rows of its membership table in the ``small``
    mock (true members plus 8% field interlopers; other sizes scale it).
    """

    name: str
    common_name: str
    ra: float
    dec: float
    distance_pc: float
    age: float
    fe_h: float
    pmra: float
    pmdec: float
    rv: float
    ebv: float
    core_pc: float
    n_table: int


#: The mock's open clusters. Positions, distances, proper motions and radial velocities are
#: rounded Gaia DR2 values (Cantat-Gaudin et al. 2018; Gaia Collaboration 2018 for the Hyades,
#: which Cantat-Gaudin et al. leave out because they cover tens of degrees); ages and [Fe/H] are
#: literature values (Netopil et al. 2016, Heiter et al. 2014); core radii are of the right
#: order. NGC 2632 (Praesepe) is the held-out test of the temperature calibration (paper Fig 17);
#: NGC 2548 lies in the equatorial stripe, so GALAH observes its brighter members too.
CLUSTERS = (
    ClusterSpec("NGC_2632", "Praesepe", 130.10, 19.67, 186.0, 0.70, 0.16, -36.05, -12.92, 34.7,
                0.027, 3.5, 400),
    ClusterSpec("Melotte_25", "Hyades", 66.75, 15.87, 47.5, 0.65, 0.13, 101.0, -28.0, 39.1,
                0.003, 3.0, 200),
    ClusterSpec("Melotte_22", "Pleiades", 56.75, 24.12, 135.8, 0.125, 0.00, 20.0, -45.5, 5.7,
                0.045, 2.0, 260),
    ClusterSpec("NGC_2682", "M67", 132.85, 11.81, 860.0, 4.0, 0.00, -10.97, -2.94, 33.6, 0.041,
                2.5, 380),
    ClusterSpec("NGC_752", "NGC 752", 29.22, 37.79, 440.0, 1.5, -0.03, 9.81, -11.71, 5.0, 0.035,
                3.0, 160),
    ClusterSpec("NGC_2548", "M48", 123.41, -5.73, 770.0, 0.45, -0.06, -1.32, 1.02, 8.6, 0.03,
                3.0, 200),
)
#: Cantat-Gaudin name of Praesepe.
PRAESEPE_NAME = "NGC_2632"
#: Fraction of a cluster's LAMOST-observable members (9 < G < 17, FGK) that LAMOST observes.
CLUSTER_LAMOST_FRACTION = 0.75

#: GALAH per-element reported uncertainty at high S/N (dex).
GALAH_ERRORS = {"o": 0.08, "mg": 0.06, "al": 0.06, "si": 0.05, "ca": 0.06, "sc": 0.06,
                "ti": 0.07, "mn": 0.06, "y": 0.10, "ba": 0.09, "eu": 0.12}


@dataclass
class Universe:
    """All tables of one mock universe (see the module docstring)."""

    size: str
    seed: int
    stars: pd.DataFrame
    lamost: pd.DataFrame
    galah: pd.DataFrame
    gaia: pd.DataFrame
    distances: pd.DataFrame
    binaries: pd.DataFrame
    members: pd.DataFrame
    meta: dict = field(default_factory=dict)

    @property
    def overlap(self) -> pd.DataFrame:
        """GALAH stars with at least one LAMOST observation (the cross-match candidates)."""
        s = self.stars
        return s[(s["sobject_id"] >= 0) & (s["n_obs"] > 0)]


def seed_sequences(seed: int) -> dict[str, np.random.SeedSequence]:
    """Independent, named streams derived from the master seed (order-independent)."""
    root = np.random.SeedSequence(seed)
    names = ("galaxy", "selection", "binaries", "cluster", "lamost", "galah", "gaia",
             "neighbours", "spectra", "galah_spectra")
    return dict(zip(names, root.spawn(len(names))))


def chunk_rng(parent: np.random.SeedSequence, index: int) -> np.random.Generator:
    """The generator of chunk ``index`` of a stream; independent of how many chunks there are."""
    return np.random.default_rng(np.random.SeedSequence(parent.entropy,
                                                        spawn_key=parent.spawn_key + (index,)))


# --------------------------------------------------------------------------------------------
# Selections
# --------------------------------------------------------------------------------------------

def galactic_lb(ra, dec):
    """Galactic longitude and latitude (deg)."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    c = SkyCoord(ra=np.asarray(ra) * u.deg, dec=np.asarray(dec) * u.deg, frame="icrs").galactic
    return c.l.to_value(u.deg), c.b.to_value(u.deg)


#: LAMOST completeness: a base rate, x1.6 towards the anticentre, x2 for faint stars in the
#: equatorial stripe -10 < dec < 10 and complete for bright (G < 14.5) stars there (the LAMOST-K2
#: and equatorial bright plates). The last sets the size of the GALAH overlap.
LAMOST_BASE = 0.16
STRIPE_BOOST = 2.0


def lamost_probability(ra, dec, g, l, b):
    """Chance that LAMOST observes a star (0 outside dec > -10, 9 < G < 17)."""
    f_mag = np.interp(g, [9.0, 14.0, 15.0, 17.0], [1.0, 1.0, 0.6, 0.35])
    anticentre = (np.abs(l - 180.0) < 45.0) & (np.abs(b) < 30.0)
    stripe = np.abs(dec) < 10.0
    f_sky = np.where(anticentre, 1.6, 1.0) * np.where(stripe, STRIPE_BOOST, 1.0)
    p = np.clip(LAMOST_BASE * f_mag * f_sky, 0.0, 1.0)
    p = np.where(stripe & (g < 14.5), 1.0, p)
    return np.where((dec > -10.0) & (g > 9.0) & (g < 17.0), p, 0.0)


def galah_probability(dec, v, b):
    """Chance that GALAH observes a star: dec < +10, 12 < V < 14, |b| > 10; in the equatorial
    stripe (K2-HERMES-like fields) all such stars and down to V = 14.5."""
    stripe = np.abs(dec) < 10.0
    p = np.where(stripe, 1.0, 0.45)
    v_max = np.where(stripe, 14.5, 14.0)
    return np.where((dec < 10.0) & (v > 12.0) & (v < v_max) & (np.abs(b) > 10.0), p, 0.0)


def n_visits(n, rng):
    """Number of LAMOST visits per star: 1, or 2+ for ~10%, 3 for ~2.5%."""
    u = rng.random(n)
    return 1 + (u < REPEAT_FRACTIONS[0]).astype(int) + (u < REPEAT_FRACTIONS[1]).astype(int)


def draw_field(target_lamost_stars: int, spec: SizeSpec, seeds) -> pd.DataFrame:
    """Draw Galaxy chunks until ``target_lamost_stars`` field stars are LAMOST targets.

    Returns the stars observed by LAMOST or GALAH (flags ``in_lamost``, ``in_galah``), in draw
    order, cut at the star that completes the LAMOST quota.
    """
    rng_gal = np.random.default_rng(seeds["galaxy"])
    rng_sel = np.random.default_rng(seeds["selection"])
    parts, n_lamost = [], 0
    while n_lamost < target_lamost_stars:
        df = galaxy.sample_stars(spec.pool_chunk, rng_gal)
        l, b = galactic_lb(df["ra"], df["dec"])
        df["l"], df["b"] = l, b
        g, v, dec = df["phot_g_mean_mag"].to_numpy(), df["vmag"].to_numpy(), df["dec"].to_numpy()
        u1, u2 = rng_sel.random(len(df)), rng_sel.random(len(df))
        df["in_lamost"] = u1 < lamost_probability(df["ra"].to_numpy(), dec, g, l, b)
        df["in_galah"] = u2 < galah_probability(dec, v, b)
        df = df[df["in_lamost"] | df["in_galah"]]
        cum = n_lamost + np.cumsum(df["in_lamost"].to_numpy())
        if cum.size and cum[-1] >= target_lamost_stars:
            stop = int(np.searchsorted(cum, target_lamost_stars)) + 1
            df = df.iloc[:stop]
        parts.append(df)
        n_lamost = int(cum[-1]) if cum.size else n_lamost
        n_lamost = min(n_lamost, target_lamost_stars)
        log.info("galaxy chunk: %d LAMOST field stars so far", n_lamost)
    out = pd.concat(parts, ignore_index=True)
    out["kind"] = "field"
    return out


# --------------------------------------------------------------------------------------------
# Wide binaries and the cluster
# --------------------------------------------------------------------------------------------

def _offset_positions(ra, dec, sep_arcsec, pa_rad):
    """Positions at angular separation ``sep`` and position angle ``pa`` (small-angle)."""
    ddec = sep_arcsec * np.cos(pa_rad) / 3600.0
    dra = sep_arcsec * np.sin(pa_rad) / 3600.0 / np.cos(np.radians(dec))
    return (ra + dra) % 360.0, dec + ddec


#: Largest distance of a wide-binary primary (kpc).
BINARY_MAX_DISTANCE_KPC = 0.8


def make_binaries(field: pd.DataFrame, n_pairs: int, rng) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Secondaries for ``n_pairs`` LAMOST dwarf primaries: same age and chemistry, their own mass.

    Primaries are LAMOST dwarfs (logg > 3.9, teff < 6500 K, not GALAH targets) within
    :data:`BINARY_MAX_DISTANCE_KPC` (El-Badry et al. 2019 searched within 200 pc; the mock goes
    further to have a thousand pairs at its survey size, over the S/N range of the catalogue's
    dwarfs). Separations are log-uniform in 50-50,000 AU (projected separations at least 3 arcsec so that
    Gaia resolves both); the secondary's velocity differs by the orbital speed. About 85% of the
    secondaries are LAMOST targets too. Returns ``(secondaries, pairs)``: new star rows and a
    table of (primary index in ``field``, secondary index in ``secondaries``).
    """
    cand = field.index[field["in_lamost"] & ~field["in_galah"] & (field["logg"] > 3.9)
                       & (field["distance"] < BINARY_MAX_DISTANCE_KPC) & (field["teff"] < 6500)]
    cand = rng.permutation(np.asarray(cand))
    rows, pairs = [], []
    for idx in cand:
        if len(rows) >= n_pairs:
            break
        p = field.loc[idx]
        m2 = rng.uniform(0.6, 1.0) * p["mass"]
        teff, logg, mg = galaxy.track(np.array([m2]), np.array([0]), np.array([0.0]),
                                      p["age"], np.array([p["fe_h"]]))
        teff, logg, mg = float(teff[0]), float(logg[0]), float(mg[0])
        if not (galaxy.TEFF_RANGE[0] <= teff <= galaxy.TEFF_RANGE[1]):
            continue
        g, v = galaxy.photometry(np.array([teff]), np.array([mg]), np.array([p["distance"]]),
                                 np.array([p["ebv"]]))
        if not (9.0 < g[0] < 17.0):
            continue
        d_pc = p["distance"] * 1000.0
        sep_au = np.exp(rng.uniform(np.log(50.0), np.log(50_000.0)))
        if sep_au / d_pc < 3.0:
            sep_au = 3.0 * d_pc * np.exp(rng.uniform(0.0, 1.0))
        pa = rng.uniform(0.0, 2 * np.pi)
        ra2, dec2 = _offset_positions(p["ra"], p["dec"], sep_au / d_pc, pa)
        # orbital speed ~ sqrt(G M / s): 29.8 km/s sqrt(M_tot / s_AU)
        v_orb = 29.8 * np.sqrt((p["mass"] + m2) / sep_au) * rng.uniform(0.3, 1.0)
        dv = rng.normal(size=3)
        dv *= v_orb / np.linalg.norm(dv)
        k_pm = 4.74047 * p["distance"]  # km/s per mas/yr
        s = p.copy()
        s["mass"], s["teff"], s["logg"], s["abs_g"] = m2, teff, logg, mg
        s["phase"], s["phase_index"], s["phase_u"] = "ms", 0, 0.0
        s["vmic"] = float(galaxy.vmic_relation(teff, logg)) + rng.normal(0.0, 0.05)
        s["phot_g_mean_mag"], s["vmag"] = float(g[0]), float(v[0])
        s["bp_rp"] = float(galaxy.bp_rp0(teff)) + 1.34 * p["ebv"]
        s["ra"], s["dec"] = ra2, dec2
        s["pmra"] = p["pmra"] + dv[0] / k_pm
        s["pmdec"] = p["pmdec"] + dv[1] / k_pm
        s["rv"] = p["rv"] + dv[2]
        s["in_lamost"] = bool(rng.random() < 0.85)
        s["in_galah"] = False
        s["kind"] = "binary"
        rows.append(s)
        pairs.append((idx, len(rows) - 1, sep_au))
    sec = pd.DataFrame(rows).reset_index(drop=True)
    pairs = pd.DataFrame(pairs, columns=["primary", "secondary", "sep_au_true"])
    if len(pairs) < n_pairs:
        log.warning("only %d of %d wide binaries could be made", len(pairs), n_pairs)
    return sec, pairs


def make_cluster(spec: "ClusterSpec", n_members: int, rng) -> pd.DataFrame:
    """One open cluster: one age, one chemistry, a Plummer sphere, members on the sequence.

    Parameters
    ----------
    spec : ClusterSpec
        Centre, distance, age, [Fe/H], motion, reddening and core radius.
    n_members : int
        Rows of the membership table: 92% true members (``proba`` 0.7-1.0), 8% field interlopers
        (``proba`` 0.1-0.5, their own chemistry).
    rng : numpy.random.Generator

    Returns
    -------
    DataFrame of star rows (``kind`` ``cluster`` or ``cluster_interloper``, ``cluster`` =
    ``spec.name``) with ``in_lamost`` (75% of the members with 9 < G < 17 in the kept teff range)
    and ``in_galah`` (the GALAH selection, :func:`galah_probability`).
    """
    P = spec
    n_true = int(round(n_members * 0.92))
    n_int = n_members - n_true
    # one chemistry: that of a thin-disk star of the cluster's age and [Fe/H] near the Sun, with
    # its own [X/Fe] scatter (clusters differ in chemistry, as they should)
    chem = chemistry.abundances(np.array(["thin"]), np.array([min(P.age, 10.0)]), np.array([8.15]),
                                np.array([0.07]), rng, feh=np.array([P.fe_h]))
    # IMF (slope 2.3) between 0.6 and 3.0 Msun; keep the stars alive at the cluster age
    life = 1.0 + galaxy._T_SGB + galaxy._T_RGB + galaxy._T_RC
    a_imf = -1.3
    mass = np.empty(0)
    while mass.size < n_true:
        x = rng.random(4 * n_true)
        m = (0.6**a_imf + x * (3.0**a_imf - 0.6**a_imf)) ** (1.0 / a_imf)
        mass = np.concatenate([mass, m[P.age / galaxy.ms_lifetime(m, P.fe_h) < life]])
    mass = mass[:n_true]
    tau = P.age / galaxy.ms_lifetime(mass, P.fe_h)
    edges = np.cumsum([1.0, galaxy._T_SGB, galaxy._T_RGB])
    phase = np.searchsorted(edges, tau, side="right")
    starts = np.concatenate([[0.0], edges])
    widths = np.array([1.0, galaxy._T_SGB, galaxy._T_RGB, galaxy._T_RC])
    u = np.clip((tau - starts[phase]) / widths[phase], 0.0, 1.0)
    teff, logg, mg = galaxy.track(mass, phase, u, P.age, np.full(n_true, P.fe_h))
    # Plummer sphere (3D), scale radius core_pc, truncated at 15 pc
    r = P.core_pc / np.sqrt(rng.random(n_true) ** (-2.0 / 3.0) - 1.0)
    r = np.minimum(r, 15.0)
    vec = rng.normal(size=(n_true, 3))
    vec *= (r / np.linalg.norm(vec, axis=1))[:, None]
    d_pc = P.distance_pc + vec[:, 2]
    dec = P.dec + np.degrees(vec[:, 1] / P.distance_pc)
    ra = (P.ra + np.degrees(vec[:, 0] / P.distance_pc) / np.cos(np.radians(P.dec))) % 360.0
    sig = 0.5  # km/s internal dispersion
    k = 4.74047 * d_pc / 1000.0
    df = pd.DataFrame({
        "population": "cluster", "kind": "cluster", "component": P.name,
        "age": P.age, "mass": mass, "phase_index": phase, "phase_u": u,
        "phase": np.array(galaxy.PHASES)[phase],
        "ra": ra, "dec": dec, "distance": d_pc / 1000.0,
        "pmra": P.pmra + rng.normal(0, sig, n_true) / k,
        "pmdec": P.pmdec + rng.normal(0, sig, n_true) / k,
        "rv": P.rv + rng.normal(0, sig, n_true),
        "teff": teff, "logg": logg, "abs_g": mg, "ebv": P.ebv,
        "proba": rng.choice([0.7, 0.8, 0.9, 1.0], n_true, p=[0.1, 0.15, 0.25, 0.5]),
    })
    for key, val in chem.items():
        df[key] = float(val[0])
    df["fe_h"] = P.fe_h
    df["vmic"] = galaxy.vmic_relation(teff, logg) + rng.normal(0.0, 0.05, n_true)
    # interlopers: thin-disk field dwarfs in front of or behind the cluster
    if n_int:
        m = rng.uniform(0.7, 1.2, n_int)
        age = rng.uniform(1.0, 9.0, n_int)
        ph = np.zeros(n_int, int)
        dist = np.clip(P.distance_pc / 1000.0 * rng.uniform(0.5, 2.0, n_int), 0.03, None)
        ra_i = (P.ra + rng.normal(0, 1.2, n_int) / np.cos(np.radians(P.dec))) % 360.0
        dec_i = P.dec + rng.normal(0, 1.2, n_int)
        x, y, z = galaxy.icrs_to_galactocentric_xyz(ra_i, dec_i, dist)
        ch = chemistry.abundances(np.array(["thin"] * n_int), age, np.hypot(x, y), z, rng)
        t_ms = galaxy.ms_lifetime(m, ch["fe_h"])
        u_i = np.clip(age / t_ms, 0, 1)
        t_i, g_i, mg_i = galaxy.track(m, ph, u_i, age, ch["fe_h"])
        inter = pd.DataFrame({
            "population": "thin", "kind": "cluster_interloper", "component": "thin",
            "age": age, "mass": m, "phase_index": ph, "phase_u": u_i, "phase": "ms",
            "ra": ra_i, "dec": dec_i, "distance": dist,
            "pmra": P.pmra + rng.normal(0, 8, n_int), "pmdec": P.pmdec + rng.normal(0, 8, n_int),
            "rv": rng.normal(20, 30, n_int), "teff": t_i, "logg": g_i, "abs_g": mg_i,
            "ebv": galaxy.extinction_ebv(x, y, z),
            "proba": rng.choice([0.1, 0.2, 0.3, 0.4, 0.5], n_int),
            "vmic": galaxy.vmic_relation(t_i, g_i),
        })
        for key, val in ch.items():
            inter[key] = val
        df = pd.concat([df, inter], ignore_index=True)
    g, v = galaxy.photometry(df["teff"].to_numpy(), df["abs_g"].to_numpy(),
                             df["distance"].to_numpy(), df["ebv"].to_numpy())
    df["phot_g_mean_mag"], df["vmag"] = g, v
    df["bp_rp"] = galaxy.bp_rp0(df["teff"].to_numpy()) + 1.34 * df["ebv"].to_numpy()
    ok_t = (df["teff"] >= galaxy.TEFF_RANGE[0]) & (df["teff"] <= galaxy.TEFF_RANGE[1])
    df["in_lamost"] = ok_t & (df["phot_g_mean_mag"] > 9.0) & (df["phot_g_mean_mag"] < 17.0) & (
        rng.random(len(df)) < CLUSTER_LAMOST_FRACTION)
    l, b = galactic_lb(df["ra"].to_numpy(), df["dec"].to_numpy())
    df["in_galah"] = ok_t & (rng.random(len(df)) < galah_probability(
        df["dec"].to_numpy(), df["vmag"].to_numpy(), b))
    df["cluster"] = P.name
    # Galactocentric positions and velocities for the truth table
    x, y, z = galaxy.icrs_to_galactocentric_xyz(df["ra"].to_numpy(), df["dec"].to_numpy(),
                                                df["distance"].to_numpy())
    df["x"], df["y"], df["z"], df["R"] = x, y, z, np.hypot(x, y)
    df["phi"] = np.degrees(np.arctan2(y, -x))
    return df


def make_clusters(scale: float, seed_seq, clusters=None) -> pd.DataFrame:
    """Every cluster of :data:`CLUSTERS` with ``max(8, round(scale * n_table))`` table rows.

    Cluster ``i`` draws from chunk ``i`` of the ``cluster`` stream (:func:`chunk_rng`), so adding
    a cluster at the end of the list does not change the others.
    """
    clusters = CLUSTERS if clusters is None else clusters
    parts = [make_cluster(c, max(8, int(round(scale * c.n_table))), chunk_rng(seed_seq, i))
             for i, c in enumerate(clusters)]
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------------------------
# LAMOST observations
# --------------------------------------------------------------------------------------------

_SUBCLASS = ((7200, "F0"), (6900, "F2"), (6500, "F5"), (6150, "F9"), (5950, "G0"), (5800, "G2"),
             (5650, "G5"), (5450, "G8"), (5250, "K0"), (5100, "K1"), (4800, "K3"), (4600, "K4"),
             (4400, "K5"), (4050, "K7"), (3850, "M0"))


def subclass_of(teff):
    """LAMOST-like spectral subclass (nearest MK type) from teff."""
    t = np.array([a for a, _ in _SUBCLASS], float)
    names = np.array([b for _, b in _SUBCLASS])
    return names[np.abs(np.asarray(teff, float)[:, None] - t[None, :]).argmin(axis=1)]


def designation(ra, dec, prefix="LAMOST J"):
    """IAU-style designation ``LAMOST JHHMMSS.ss+DDMMSS.s`` from degrees."""
    ra = np.asarray(ra, float) % 360.0
    dec = np.asarray(dec, float)
    h = ra / 15.0
    hh = np.floor(h).astype(int)
    mm = np.floor((h - hh) * 60).astype(int)
    ss = np.floor(((h - hh) * 60 - mm) * 60 * 100).astype(int) / 100.0
    sign = np.where(dec < 0, "-", "+")
    ad = np.abs(dec)
    dd = np.floor(ad).astype(int)
    dm = np.floor((ad - dd) * 60).astype(int)
    ds = np.floor(((ad - dd) * 60 - dm) * 60 * 10).astype(int) / 10.0
    return np.array([f"{prefix}{a:02d}{b:02d}{c:05.2f}{s}{d:02d}{e:02d}{f:04.1f}"
                     for a, b, c, s, d, e, f in zip(hh, mm, ss, sign, dd, dm, ds)])


def twomass_id(ra, dec):
    """2MASS-style identifier ``JHHMMSSss+DDMMSSs`` (GALAH's ``star_id``)."""
    d = designation(ra, dec, prefix="J")
    return np.array([s.replace(".", "") for s in d])


def mjd_to_date(mjd):
    """ISO dates (YYYY-MM-DD) of integer MJDs."""
    base = np.datetime64("1858-11-17")
    return np.array([str(base + np.timedelta64(int(m), "D")) for m in np.asarray(mjd)])


def _tile(ra, dec, size=5.0):
    """Field tiles of about ``size`` deg: (tile id, centre ra, centre dec)."""
    band = np.floor((dec + 90.0) / size).astype(int)
    dec_c = -90.0 + (band + 0.5) * size
    n_ra = np.maximum(1, np.floor(360.0 * np.cos(np.radians(dec_c)) / size)).astype(int)
    col = np.floor(ra / 360.0 * n_ra).astype(int) % n_ra
    ra_c = (col + 0.5) * 360.0 / n_ra
    return band * 1000 + col, ra_c, dec_c


def _planid(ra_c, dec_c, cls, anticentre, number):
    h = ra_c / 15.0
    hh, mm = int(h), int((h - int(h)) * 60)
    ss = int((((h - int(h)) * 60) - mm) * 60)
    sign = "N" if dec_c >= 0 else "S"
    ad = abs(dec_c)
    dd, dm = int(ad), int((ad - int(ad)) * 60)
    prefix = "GAC" if anticentre else "EG"
    return f"{prefix}{hh:02d}{mm:02d}{ss:02d}{sign}{dd:02d}{dm:02d}00{cls}{number:02d}"


def make_lamost_observations(stars: pd.DataFrame, rng) -> pd.DataFrame:
    """One row per LAMOST observation of the stars with ``in_lamost``: plates, ids, file names,
    target S/N, observed radial velocity and LASP-like labels. ``stars`` must have ``n_obs``."""
    sel = stars.index[stars["n_obs"] > 0]
    rep = stars.loc[sel, "n_obs"].to_numpy()
    star_idx = np.repeat(sel.to_numpy(), rep)
    visit = np.concatenate([np.arange(k) for k in rep]) if len(rep) else np.zeros(0, int)
    s = stars.loc[star_idx].reset_index(drop=True)
    n = len(s)
    g = s["phot_g_mean_mag"].to_numpy()
    cls = np.where(g < 14.0, "B", np.where(g < 16.0, "M", "F"))
    tile, ra_c, dec_c = _tile(s["ra_lamost"].to_numpy(), s["dec_lamost"].to_numpy())
    anti = (np.abs(s["l"].to_numpy() - 180.0) < 45.0) & (np.abs(s["b"].to_numpy()) < 30.0)
    obs = pd.DataFrame({"star": star_idx, "visit": visit, "tile": tile, "cls": cls,
                        "ra_c": ra_c, "dec_c": dec_c, "anti": anti})
    # one plate per (tile, class, visit); split plates with more than 16 x 250 fibres
    obs["order"] = rng.permutation(n)
    obs = obs.sort_values(["tile", "cls", "visit", "order"], kind="stable").reset_index(drop=True)
    key = obs["tile"].astype(str) + obs["cls"] + obs["visit"].astype(str)
    j = obs.groupby(key, sort=False).cumcount().to_numpy()
    obs["sub"] = j // 4000
    obs["spid"] = (j % 4000) // 250 + 1
    obs["fiberid"] = j % 250 + 1
    plate_key = key + "_" + obs["sub"].astype(str)
    base_key = obs["tile"].astype(str) + obs["cls"] + "_" + obs["sub"].astype(str)
    bases = base_key.drop_duplicates()
    lmjd = dict(zip(bases, rng.integers(LMJD_RANGE[0], LMJD_RANGE[1] - 150, len(bases))))
    first = obs.groupby(plate_key, sort=False).first()
    planid = {k: _planid(r.ra_c, r.dec_c, r.cls, r.anti, int(r.sub) + 1)
              for k, r in zip(first.index, first.itertuples())}
    obs["lmjd"] = [lmjd[k] + 60 * v for k, v in zip(base_key, obs["visit"])]
    obs["planid"] = [planid[k] for k in plate_key]
    obs["mjd"] = obs["lmjd"] - 1
    obs = obs.sort_values(["lmjd", "planid", "spid", "fiberid"], kind="stable").reset_index(drop=True)
    obs["obsid"] = np.arange(len(obs), dtype=np.int64) + 101_000_001
    obs["filename"] = [f"spec-{a}-{b}_sp{c:02d}-{d:03d}.fits.gz" for a, b, c, d in
                       zip(obs["lmjd"], obs["planid"], obs["spid"], obs["fiberid"])]
    obs["obsdate"] = mjd_to_date(obs["mjd"])
    s = stars.loc[obs["star"].to_numpy()].reset_index(drop=True)
    obs["designation"] = s["designation"].to_numpy()
    obs["source_id"] = s["source_id"].to_numpy()
    obs["ra"] = s["ra_lamost"].to_numpy()
    obs["dec"] = s["dec_lamost"].to_numpy()
    g = s["phot_g_mean_mag"].to_numpy()
    # target S/N in g from the magnitude, with plate-to-plate (weather) and star-to-star scatter
    plate_q = dict(zip(obs["planid"].astype(str) + obs["lmjd"].astype(str),
                       rng.normal(0.0, 0.12, len(obs))))
    pq = np.array([plate_q[a + str(b)] for a, b in zip(obs["planid"], obs["lmjd"])])
    obs["snrg_target"] = np.clip(12.0 * 10 ** (0.28 * (17.0 - g) + pq + rng.normal(0, 0.08, len(obs))),
                                 3.0, 1000.0)
    # observed radial velocity: truth + plate zero point + measurement noise
    rv_zp = dict(zip(obs["planid"].astype(str) + obs["lmjd"].astype(str),
                     rng.normal(0.0, 2.0, len(obs))))
    zp = np.array([rv_zp[a + str(b)] for a, b in zip(obs["planid"], obs["lmjd"])])
    snr = obs["snrg_target"].to_numpy()
    obs["rv_obs"] = s["rv"].to_numpy() + zp + rng.normal(0.0, 1.5 + 60.0 / snr)
    # LASP-like labels: truth + errors + small systematics
    teff, logg, feh = (s[c].to_numpy() for c in ("teff", "logg", "fe_h"))
    giant = logg < 3.5
    alpha = chemistry.mean_alpha(s)
    e_t = 60.0 + 2000.0 / snr
    e_g = 0.08 + 3.0 / snr
    e_f = 0.05 + 2.0 / snr
    obs["teff"] = teff + np.where(giant, 40.0, -30.0) + rng.normal(0, e_t)
    obs["logg"] = logg + 0.05 * (4.2 - logg) * (teff > 6000) + np.where(giant, 0.08, 0.0) + rng.normal(0, e_g)
    obs["feh"] = 0.93 * feh - 0.03 + 0.3 * alpha + rng.normal(0, e_f)
    obs["teff_err"], obs["logg_err"], obs["feh_err"] = e_t, e_g, e_f
    bad = snr < 6.0
    for c in ("teff", "logg", "feh", "teff_err", "logg_err", "feh_err"):
        obs.loc[bad, c] = -9999.0
    obs["class"] = "STAR"
    obs["subclass"] = subclass_of(teff)
    obs["mag_g"] = g
    return obs.drop(columns=["order", "cls", "ra_c", "dec_c", "anti", "tile", "sub"])


# --------------------------------------------------------------------------------------------
# GALAH
# --------------------------------------------------------------------------------------------

#: Temperature systematics of the GALAH-like dwarf abundances (dex): ``[X/Fe]_reported =
#: [X/Fe]_true + w(logg) (a1 x + a2 x**2 + a3 x**3) + noise`` with ``x = (teff - 5750 K) / 1000 K``
#: (clipped to [-2, 1.25]) and ``w`` a smooth step from 0 at logg 3.5 to 1 at logg 4.1, so
#: giants are untouched. The paper traces the teff trends of its dwarf abundances to the training
#: labels (section 5.2 and appendix B): cool dwarfs' [alpha/Fe], [Sc/Fe] and [Eu/Fe] too high,
#: their s-process too low, [O/Fe] rising with teff. The shapes are chosen to vanish near the solar
#: temperature (where GALAH's scale is anchored) and the amplitudes so that the mock reproduces the
#: paper's two diagnostics: Praesepe's [alpha/Fe] dispersion of ~0.07 dex with a visible trend
#: (Fig 17), and wide binaries that look like field pairs without the Delta teff < 250 K cut
#: (section 5.2). They are not measured GALAH DR2 biases. See ``docs/mock_universe.md``.
GALAH_DWARF_SYSTEMATICS = {
    "o": (+0.10, +0.04, 0.0),
    "mg": (-0.03, +0.03, 0.0),
    "al": (-0.03, +0.02, 0.0),
    "si": (-0.02, +0.02, 0.0),
    "ca": (-0.04, +0.03, 0.0),
    "sc": (-0.06, +0.05, 0.0),
    "ti": (-0.08, +0.05, 0.0),
    "mn": (+0.03, 0.00, 0.0),
    "y": (+0.06, -0.03, 0.0),
    "ba": (+0.08, -0.04, 0.0),
    "eu": (-0.10, +0.06, +0.02),
}
#: Pivot temperature (K) and logg range of the taper of :data:`GALAH_DWARF_SYSTEMATICS`.
SYSTEMATICS_TEFF0 = 5750.0
SYSTEMATICS_LOGG = (3.5, 4.1)


def galah_dwarf_systematics(teff, logg) -> dict[str, np.ndarray]:
    """The teff-dependent bias of each GALAH-like dwarf abundance (dex), from the true labels.

    Parameters
    ----------
    teff : array (S,), K
    logg : array (S,), dex

    Returns
    -------
    dict ``{x: (S,) array}`` for x in :data:`GALAH_DWARF_SYSTEMATICS`; zero for giants
    (logg < 3.5), rising smoothly to the full value at logg 4.1.
    """
    teff = np.asarray(teff, float)
    logg = np.asarray(logg, float)
    x = np.clip((teff - SYSTEMATICS_TEFF0) / 1000.0, -2.0, 1.25)
    lo, hi = SYSTEMATICS_LOGG
    u = np.clip((logg - lo) / (hi - lo), 0.0, 1.0)
    w = u * u * (3.0 - 2.0 * u)
    return {el: w * (a1 * x + a2 * x**2 + a3 * x**3)
            for el, (a1, a2, a3) in GALAH_DWARF_SYSTEMATICS.items()}


def training_label_bias(teff, logg, labels, *, anchor=None) -> dict[str, np.ndarray]:
    """The bias of the training labels (dex) that :func:`galah_dwarf_systematics` puts in.

    ``alpha_fe`` and ``s_fe`` are error-weighted means of Mg, Si, Ca, Ti and of Ba, Y, as the
    pipeline forms them (the GALAH errors of one star scale together, so the weights are those
    of :data:`GALAH_ERRORS`). With ``anchor`` (a table of ``teff``, ``logg``: the reference set)
    the bias's mean over those stars is subtracted, as the calibration's anchor does. For
    figures and checks of the mock only.
    """
    from ..cleaning import DERIVED_LABELS

    def bias(t, g):
        b = galah_dwarf_systematics(t, g)
        out = {}
        for name in labels:
            if name in DERIVED_LABELS:
                w = np.array([1.0 / GALAH_ERRORS[x] ** 2 for x in DERIVED_LABELS[name]])
                out[name] = sum(wi * b[x] for wi, x in zip(w / w.sum(), DERIVED_LABELS[name]))
            else:
                out[name] = b[name[:-3]]
        return out

    out = bias(np.asarray(teff, float), np.asarray(logg, float))
    if anchor is not None:
        ref = bias(np.asarray(anchor["teff"], float), np.asarray(anchor["logg"], float))
        out = {k: v - np.nanmean(ref[k]) for k, v in out.items()}
    return out


def make_galah(stars: pd.DataFrame, rng, wrong_fraction=0.12) -> pd.DataFrame:
    """GALAH DR2.1-schema catalogue of the stars with ``in_galah``.

    Reported labels are truth + N(0, e) with S/N-dependent ``e``; a fraction ``wrong_fraction`` of
    stars has 1-3 abundances (and for a fifth of them teff or logg) off by 0.25-0.6 dex (300 K,
    0.4 dex) without being flagged; their ``chi2_cannon`` is typically larger. Dwarf abundances
    carry the teff-dependent systematics of :func:`galah_dwarf_systematics`; the columns
    ``model_<x>_fe`` (not written to the catalogue) hold the labels without them, from which the
    window spectra's best-fit model is made.
    """
    s = stars[stars["in_galah"]]
    n = len(s)
    v = s["vmag"].to_numpy()
    snr2 = 40.0 * 10 ** (0.2 * (14.5 - v) + rng.normal(0, 0.12, n))
    snr = np.stack([0.62 * snr2, snr2, 1.25 * snr2, 1.12 * snr2], axis=1)
    snr *= 10 ** rng.normal(0, 0.03, (n, 4))
    g = pd.DataFrame(index=s.index)
    g["sobject_id"] = s["sobject_id"].to_numpy()
    g["star_id"] = twomass_id(s["ra_galah"], s["dec_galah"])
    g["ra"], g["dec"] = s["ra_galah"].to_numpy(), s["dec_galah"].to_numpy()
    scale = 1.0 + 25.0 / snr2
    g["teff"] = s["teff"].to_numpy() + rng.normal(0, 75.0 * scale)
    g["e_teff"] = 75.0 * scale
    g["logg"] = s["logg"].to_numpy() + rng.normal(0, 0.15 * scale)
    g["e_logg"] = 0.15 * scale
    g["fe_h"] = s["fe_h"].to_numpy() + rng.normal(0, 0.06 * scale)
    g["e_fe_h"] = 0.06 * scale
    g["flag_fe_h"] = (rng.random(n) < 0.02).astype(np.int32)
    g["vmic"] = s["vmic"].to_numpy() + rng.normal(0, 0.08 * scale)
    g["vsini"] = np.abs(rng.normal(0, 3.0, n)) + 3.0 + 10.0 * np.clip(
        (s["teff"].to_numpy() - 6000.0) / 1000.0, 0, 1) * rng.random(n)
    for x in ELEMENTS:
        e = GALAH_ERRORS[x] * scale
        g[f"{x}_fe"] = s[f"{x}_fe"].to_numpy() + rng.normal(0, e)
        g[f"e_{x}_fe"] = e
        p_flag = 0.03 + (0.4 if x == "eu" else 0.0) * (s["teff"].to_numpy() > 6000)
        g[f"flag_{x}_fe"] = (rng.random(n) < p_flag).astype(np.int32)
    # wrong labels
    wrong = rng.random(n) < wrong_fraction
    wrong_list = np.full(n, "", dtype=object)
    for i in np.flatnonzero(wrong):
        k = rng.integers(1, 4)
        els = rng.choice(ELEMENTS, size=k, replace=False)
        names = []
        for x in els:
            g.iloc[i, g.columns.get_loc(f"{x}_fe")] += rng.choice([-1, 1]) * rng.uniform(0.25, 0.6)
            names.append(f"{x}_fe")
        if rng.random() < 0.2:
            if rng.random() < 0.5:
                g.iloc[i, g.columns.get_loc("teff")] += rng.choice([-1, 1]) * 300.0
                names.append("teff")
            else:
                g.iloc[i, g.columns.get_loc("logg")] += rng.choice([-1, 1]) * 0.4
                names.append("logg")
        wrong_list[i] = ",".join(names)
    # teff-dependent systematics of the dwarf abundances: in the reported labels only. The
    # window-spectra model keeps the labels without them (GALAH's model fits its spectrum; the
    # bias is in the physics behind the model), see ``model_<x>_fe``.
    bias = galah_dwarf_systematics(s["teff"].to_numpy(), s["logg"].to_numpy())
    for x in ELEMENTS:
        g[f"model_{x}_fe"] = g[f"{x}_fe"].to_numpy()
        g[f"{x}_fe"] = g[f"{x}_fe"].to_numpy() + bias[x]
    # alpha_fe: error-weighted mean of Mg, Si, Ca, Ti
    w = np.array([1.0 / GALAH_ERRORS[x] ** 2 for x in ("mg", "si", "ca", "ti")])
    g["alpha_fe"] = sum(w[i] * g[f"{x}_fe"] for i, x in enumerate(("mg", "si", "ca", "ti"))) / w.sum()
    # global fit quality: chi2_cannon grows with S/N and for wrong labels
    chi2 = np.exp(rng.normal(np.log(1.1) + 0.25 * np.log(snr2 / 50.0), 0.45))
    chi2 = np.where(wrong, chi2 * np.exp(rng.normal(1.3, 0.6, n)), chi2)
    g["chi2_cannon"] = chi2.astype(np.float32)
    flag = np.zeros(n, np.int32)
    flag |= np.where(chi2 > 4.0, 1, 0).astype(np.int32)                       # poor fit
    flag |= np.where(snr2 < 15.0, 2, 0).astype(np.int32)                      # low S/N
    flag |= np.where((g["teff"] > 6800) | (g["logg"] < 1.2), 4, 0).astype(np.int32)  # off-grid
    flag |= np.where(rng.random(n) < 0.05, 8, 0).astype(np.int32)             # binarity etc.
    flag |= np.where(wrong & (rng.random(n) < 0.3), 16, 0).astype(np.int32)   # suspicious fit
    g["flag_cannon"] = flag
    for k in range(4):
        g[f"snr_c{k + 1}"] = snr[:, k].astype(np.float32)
    g["galah_wrong"] = wrong
    g["wrong_labels"] = wrong_list.astype(str)
    return g.reset_index(names="star")


# --------------------------------------------------------------------------------------------
# Gaia and distances
# --------------------------------------------------------------------------------------------

def gaia_source_ids(ra, dec):
    """Gaia-like source_ids: a 0.1-degree sky cell index times 2**35 plus a running number."""
    ira = np.floor((np.asarray(ra) % 360.0) * 10).astype(np.int64)
    idec = np.floor((np.asarray(dec) + 90.0) * 10).astype(np.int64).clip(0, 1799)
    cell = idec * 3600 + ira
    order = np.lexsort((np.asarray(dec), np.asarray(ra), cell))
    counter = np.empty(len(cell), np.int64)
    sc = cell[order]
    first = np.r_[True, sc[1:] != sc[:-1]]
    run = np.arange(len(sc)) - np.maximum.accumulate(np.where(first, np.arange(len(sc)), 0))
    counter[order] = run + 1
    return cell * (2**35) + counter * 1024 + 17


def parallax_error(g):
    """Gaia DR2-like parallax uncertainty (mas) against G."""
    g = np.asarray(g, float)
    return np.sqrt(0.03**2 + (0.1 * 10 ** (0.3 * (g - 17.0))) ** 2)


def make_gaia(stars: pd.DataFrame, rng) -> pd.DataFrame:
    """Gaia DR2 columns with DR2-like noise (and the -0.029 mas parallax zero point)."""
    n = len(stars)
    g = stars["phot_g_mean_mag"].to_numpy()
    sig = parallax_error(g)
    plx = 1.0 / stars["distance"].to_numpy() - 0.029 + rng.normal(0, sig)
    pm_sig = 1.4 * sig
    rv_ok = g < 13.0
    rv_err = np.where(rv_ok, 0.6 + 2.0 * 10 ** (0.4 * (g - 13.0)), np.nan)
    out = pd.DataFrame({
        "source_id": stars["source_id"].to_numpy().astype(np.int64),
        "ra": stars["ra"].to_numpy(), "dec": stars["dec"].to_numpy(),
        "ref_epoch": np.full(n, 2015.5),
        "parallax": plx, "parallax_error": sig,
        "pmra": stars["pmra"].to_numpy() + rng.normal(0, pm_sig), "pmra_error": pm_sig,
        "pmdec": stars["pmdec"].to_numpy() + rng.normal(0, pm_sig), "pmdec_error": pm_sig,
        "radial_velocity": np.where(rv_ok, stars["rv"].to_numpy() + rng.normal(0, np.nan_to_num(rv_err)), np.nan),
        "radial_velocity_error": rv_err,
        "phot_g_mean_mag": g + rng.normal(0, 0.003, n),
    })
    return out.sort_values("source_id", kind="stable").reset_index(drop=True)


def bailer_jones_distances(source_id, parallax, parallax_error, length_kpc=1.35,
                           chunk=20_000, n_grid=240) -> pd.DataFrame:
    """Bailer-Jones et al. (2018)-like distances (pc): the mode ``r_est`` of the exponentially
    decreasing space density posterior with length scale ``length_kpc`` and a 68% interval
    ``[r_lo, r_hi]`` (the 15.87/84.13% quantiles, widened to contain the mode when needed).

    The posterior is evaluated on a per-star logarithmic grid spanning +-6 sigma in parallax.
    """
    plx = np.asarray(parallax, float)
    sig = np.asarray(parallax_error, float)
    n = len(plx)
    r_est, r_lo, r_hi = np.empty(n), np.empty(n), np.empty(n)
    L = length_kpc
    t = np.linspace(0.0, 1.0, n_grid)[None, :]
    for a in range(0, n, chunk):
        p, s = plx[a:a + chunk, None], sig[a:a + chunk, None]
        hi_plx = p + 6 * s
        lo_plx = p - 6 * s
        r_min = np.clip(1.0 / np.maximum(hi_plx, 1e-3), 0.002, 60.0)
        r_max = np.where(lo_plx > 0, 1.0 / np.maximum(lo_plx, 1e-6), 80.0)
        r_max = np.clip(np.maximum(r_max, 1.5 * r_min), 0.003, 80.0)
        r = r_min * (r_max / r_min) ** t
        logpost = 2 * np.log(r) - r / L - 0.5 * ((p - 1.0 / r) / s) ** 2
        post = np.exp(logpost - logpost.max(axis=1, keepdims=True)) * r  # density per log r
        cdf = np.cumsum(0.5 * (post[:, 1:] + post[:, :-1]), axis=1)
        cdf = np.concatenate([np.zeros((len(p), 1)), cdf], axis=1)
        cdf /= cdf[:, -1:]
        i = np.clip(np.argmax(logpost, axis=1), 1, n_grid - 2)
        rows = np.arange(len(p))
        y0, y1, y2 = logpost[rows, i - 1], logpost[rows, i], logpost[rows, i + 1]
        den = y0 - 2 * y1 + y2
        shift = np.where(den < 0, 0.5 * (y0 - y2) / np.where(den < 0, den, -1.0), 0.0)
        lr = np.log(r[rows, i]) + np.clip(shift, -1, 1) * (np.log(r[rows, 1]) - np.log(r[rows, 0]))
        mode = np.exp(lr)
        q = []
        for level in (0.158655, 0.841345):
            k = np.clip((cdf < level).sum(axis=1), 1, n_grid - 1)
            c0, c1 = cdf[rows, k - 1], cdf[rows, k]
            f = np.clip((level - c0) / np.maximum(c1 - c0, 1e-300), 0, 1)
            q.append(np.exp(np.log(r[rows, k - 1]) + f * (np.log(r[rows, k]) - np.log(r[rows, k - 1]))))
        r_est[a:a + chunk] = mode
        r_lo[a:a + chunk] = np.minimum(q[0], mode)
        r_hi[a:a + chunk] = np.maximum(q[1], mode)
    return pd.DataFrame({"source_id": np.asarray(source_id, np.int64), "r_est": r_est * 1000.0,
                         "r_lo": r_lo * 1000.0, "r_hi": r_hi * 1000.0})


def make_neighbours(stars: pd.DataFrame, rng, fraction=0.04) -> pd.DataFrame:
    """Faint background Gaia sources 0.3-4 arcsec from some LAMOST stars (1-6 mag fainter)."""
    host = stars[stars["n_obs"] > 0]
    pick = host.sample(frac=fraction, random_state=rng.integers(2**31)) if len(host) else host
    n = len(pick)
    sep = rng.uniform(0.3, 4.0, n)
    pa = rng.uniform(0, 2 * np.pi, n)
    ra, dec = _offset_positions(pick["ra"].to_numpy(), pick["dec"].to_numpy(), sep, pa)
    dist = rng.uniform(1.0, 8.0, n)
    return pd.DataFrame({
        "kind": "neighbour", "population": "neighbour", "component": "neighbour",
        "ra": ra, "dec": dec, "distance": dist,
        "pmra": rng.normal(-1.0, 3.0, n), "pmdec": rng.normal(-2.0, 3.0, n),
        "rv": rng.normal(0, 60, n),
        "phot_g_mean_mag": pick["phot_g_mean_mag"].to_numpy() + rng.uniform(1.0, 6.0, n),
        "in_lamost": False, "in_galah": False, "neighbour_of": pick.index.to_numpy(),
    })


# --------------------------------------------------------------------------------------------
# The whole universe
# --------------------------------------------------------------------------------------------

def build_universe(size: str = "small", seed: int = 2020, n_lamost: int | None = None) -> Universe:
    """Draw every table of the mock universe except the spectra (a few seconds for ``small``).

    Parameters
    ----------
    size : {"tiny", "small", "large"}
    seed : master seed; the same (size, seed, n_lamost) always gives the same universe.
    n_lamost : optional override of the number of LAMOST observations.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    spec = SIZES[size]
    n_obs_target = int(n_lamost) if n_lamost is not None else spec.n_lamost_obs
    if n_obs_target < 50:
        raise ValueError(f"n_lamost must be >= 50, got {n_obs_target}")
    scale = n_obs_target / spec.n_lamost_obs
    n_bin = max(3, int(round(spec.n_binaries * min(scale, 3.0))))
    seeds = seed_sequences(seed)
    cl = make_clusters(spec.cluster_scale, seeds["cluster"])
    mean_visits = 1.0 + sum(REPEAT_FRACTIONS)
    # the LAMOST quota is shared: secondaries (85% observed) and cluster members take their part
    n_extra_obs = (0.85 * n_bin + int(cl["in_lamost"].sum())) * mean_visits
    target_field = max(20, int(round((n_obs_target - n_extra_obs) / mean_visits)))

    field = draw_field(target_field, spec, seeds)
    sec, pairs = make_binaries(field, n_bin, np.random.default_rng(seeds["binaries"]))
    stars = pd.concat([field, sec, cl], ignore_index=True)
    pairs["secondary"] += len(field)
    stars["binary_id"] = -1
    stars.loc[pairs["primary"].to_numpy(), "binary_id"] = np.arange(len(pairs))
    stars.loc[pairs["secondary"].to_numpy(), "binary_id"] = np.arange(len(pairs))
    stars.loc[pairs["primary"].to_numpy(), "kind"] = "binary"
    if "cluster" not in stars:
        stars["cluster"] = ""
    stars["cluster"] = stars["cluster"].fillna("")
    l, b = galactic_lb(stars["ra"], stars["dec"])
    stars["l"], stars["b"] = l, b
    # Galactocentric phase space of the added stars (secondaries, cluster) from their observables
    add = (stars["kind"] != "field").to_numpy()
    x, y, z, vR, vT, vz = galaxy.from_observables(
        *(stars.loc[add, c].to_numpy() for c in ("ra", "dec", "distance", "pmra", "pmdec", "rv")))
    stars.loc[add, "x"], stars.loc[add, "y"], stars.loc[add, "z"] = x, y, z
    stars.loc[add, "R"] = np.hypot(x, y)
    stars.loc[add, "phi"] = np.degrees(np.arctan2(y, -x))
    stars.loc[add, "vR"], stars.loc[add, "vT"], stars.loc[add, "vz"] = vR, vT, vz

    rng_l = np.random.default_rng(seeds["lamost"])
    stars["n_obs"] = np.where(stars["in_lamost"], n_visits(len(stars), rng_l), 0)
    jit = rng_l.normal(0.0, 0.15 / 3600.0, (len(stars), 2))
    stars["ra_lamost"] = (stars["ra"] + jit[:, 0] / np.cos(np.radians(stars["dec"]))) % 360.0
    stars["dec_lamost"] = stars["dec"] + jit[:, 1]
    stars["designation"] = np.where(stars["n_obs"] > 0,
                                    designation(stars["ra_lamost"], stars["dec_lamost"]), "")
    rng_g = np.random.default_rng(seeds["galah"])
    jit = rng_g.normal(0.0, 0.08 / 3600.0, (len(stars), 2))
    stars["ra_galah"] = (stars["ra"] + jit[:, 0] / np.cos(np.radians(stars["dec"]))) % 360.0
    stars["dec_galah"] = stars["dec"] + jit[:, 1]
    stars["sobject_id"] = _sobject_ids(stars, rng_g)

    # Gaia: every star plus faint neighbours of some LAMOST stars
    neigh = make_neighbours(stars, np.random.default_rng(seeds["neighbours"]))
    stars = pd.concat([stars, neigh], ignore_index=True)
    stars["neighbour_of"] = stars["neighbour_of"].fillna(-1).astype(np.int64)
    for col in ("in_lamost", "in_galah"):
        stars[col] = stars[col].fillna(False).astype(bool)
    stars["n_obs"] = stars["n_obs"].fillna(0).astype(int)
    stars["sobject_id"] = stars["sobject_id"].fillna(-1).astype(np.int64)
    stars["binary_id"] = stars["binary_id"].fillna(-1).astype(np.int64)
    stars["designation"] = stars["designation"].fillna("")
    stars["cluster"] = stars["cluster"].fillna("")
    stars["source_id"] = gaia_source_ids(stars["ra"].to_numpy(), stars["dec"].to_numpy())

    lamost = make_lamost_observations(stars, rng_l)
    galah = make_galah(stars, rng_g)
    stars["galah_wrong"] = False
    stars.loc[galah["star"].to_numpy(), "galah_wrong"] = galah["galah_wrong"].to_numpy()
    stars["wrong_labels"] = ""
    stars.loc[galah["star"].to_numpy(), "wrong_labels"] = galah["wrong_labels"].to_numpy()

    rng_gaia = np.random.default_rng(seeds["gaia"])
    gaia = make_gaia(stars, rng_gaia)
    dist = bailer_jones_distances(gaia["source_id"], gaia["parallax"], gaia["parallax_error"])

    p = stars.loc[pairs["primary"].to_numpy()].reset_index(drop=True)
    q = stars.loc[pairs["secondary"].to_numpy()].reset_index(drop=True)
    gi = gaia.set_index("source_id")
    plx1 = gi.loc[p["source_id"].to_numpy(), "parallax"].to_numpy()
    theta = _angsep(p["ra"], p["dec"], q["ra"], q["dec"])
    binaries = pd.DataFrame({
        "source_id1": p["source_id"].to_numpy(), "source_id2": q["source_id"].to_numpy(),
        "ra1": p["ra"].to_numpy(), "dec1": p["dec"].to_numpy(),
        "ra2": q["ra"].to_numpy(), "dec2": q["dec"].to_numpy(),
        "sep_AU": theta * 3600.0 * 1000.0 / np.maximum(plx1, 0.05),
        "pairdistance": theta,
        "phot_g_mean_mag1": gi.loc[p["source_id"].to_numpy(), "phot_g_mean_mag"].to_numpy(),
        "phot_g_mean_mag2": gi.loc[q["source_id"].to_numpy(), "phot_g_mean_mag"].to_numpy(),
    })
    cm = stars[stars["cluster"] != ""]
    members = pd.DataFrame({"source_id": cm["source_id"].to_numpy(), "ra": cm["ra"].to_numpy(),
                            "dec": cm["dec"].to_numpy(), "cluster": cm["cluster"].to_numpy(),
                            "proba": cm["proba"].to_numpy().astype(np.float32)})
    members = members.sort_values("source_id", kind="stable").reset_index(drop=True)
    meta = {"size": size, "seed": int(seed), "n_lamost_target": n_obs_target}
    log.info("universe: %d stars, %d LAMOST observations, %d GALAH stars, %d overlap",
             len(stars), len(lamost), len(galah),
             int(((stars["sobject_id"] >= 0) & (stars["n_obs"] > 0)).sum()))
    return Universe(size, int(seed), stars, lamost, galah, gaia, dist, binaries, members, meta)


def _angsep(ra1, dec1, ra2, dec2):
    """Angular separation (deg), haversine."""
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(a, float)) for a in (ra1, dec1, ra2, dec2))
    h = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(h)))


def _sobject_ids(stars, rng):
    """GALAH-like sobject_id (yymmdd, field, run, pivot) for the stars with ``in_galah``."""
    out = np.full(len(stars), -1, np.int64)
    idx = np.flatnonzero(stars["in_galah"].to_numpy())
    if idx.size == 0:
        return out
    tile, _, _ = _tile(stars["ra"].to_numpy()[idx], stars["dec"].to_numpy()[idx], size=2.0)
    order = np.lexsort((idx, tile))
    tile_s = tile[order]
    first = np.r_[True, tile_s[1:] != tile_s[:-1]]
    j = np.arange(len(tile_s)) - np.maximum.accumulate(np.where(first, np.arange(len(tile_s)), 0))
    field_no = np.cumsum(first)  # 1..n_fields
    days = rng.integers(GALAH_MJD_RANGE[0], GALAH_MJD_RANGE[1], int(field_no.max()) + 1)
    dates = mjd_to_date(days)
    yymmdd = np.array([int(d[2:4] + d[5:7] + d[8:10]) for d in dates], np.int64)
    run = j // 350 + 1
    pivot = j % 350 + 1
    sid = (yymmdd[field_no] * 10**9 + (field_no % 10000) * 10**5 + run * 10**3 + pivot)
    out[idx[order]] = sid
    return out
