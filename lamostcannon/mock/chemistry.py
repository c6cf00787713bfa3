"""Chemistry of the mock Galaxy: [Fe/H] and [X/Fe] for the five nucleosynthetic channels.

The recipe (documented with its numbers in ``docs/mock_universe.md``):

* **[Fe/H]**. Thin disk: set at the birth radius ``R_b = R + N(0, 1.5 sqrt(age/10 Gyr))`` kpc
  (radial migration) as ``0.05 - 0.06 (R_b - 8) - 0.03 (age - 4) - 0.1 |z|`` with 0.12 dex
  scatter: a radial gradient of -0.06 dex/kpc, older stars poorer, and a vertical gradient from the
  explicit ``|z|`` term plus the age-scale-height relation and the flaring of the old thin disk.
  Thick disk ``N(-0.45, 0.22)`` falling 0.05 dex/kpc with ``|z|`` and with age;
  in-situ halo ``N(-0.75, 0.35)``; accreted halo ``N(-1.3, 0.35)``. Clipped to [-2.5, 0.5].
* **alpha**. A per-star enhancement ``A``: low-alpha thin-disk sequence ``-0.17 [Fe/H]`` (clipped to
  [-0.05, 0.15]); high-alpha sequence (thick disk, in-situ halo) with a 0.30 dex plateau and a knee
  at [Fe/H] = -0.65, declining by 0.244 per dex; accreted halo: a 0.28 dex plateau with an early knee
  at [Fe/H] = -1.9 and 0.30 per dex decline (low alpha at low [Fe/H]). A shared 0.025 dex scatter.
* **Elements** ``[X/Fe] = a_X A + b_X + c_X [Fe/H] + population term + N(0, sigma_X)``: O, Mg, Si,
  Ca, Ti with amplitudes 1.25, 1.0, 0.7, 0.6, 0.75; Eu alpha-like with more scatter (0.08) and
  +0.25 dex in the accreted halo; Al alpha-like, lower at low metallicity and -0.25 dex in the
  accreted halo; Sc mildly alpha-like; Mn rising with [Fe/H] (0.25 per dex) and lower in
  alpha-rich and accreted stars; Ba and Y from an s-process term that rises in the young thin disk
  (-0.045 dex/Gyr with age) and peaks near [Fe/H] = -0.15.
"""

from __future__ import annotations

import numpy as np

from ..labels import ALPHA_ELEMENTS, ELEMENTS

FEH_RANGE = (-2.5, 0.5)

#: alpha amplitude, offset, [Fe/H] slope and intrinsic scatter (dex) per element
_ALPHA_LIKE = {
    "o": (1.25, 0.00, -0.10, 0.06),
    "mg": (1.00, 0.02, 0.00, 0.03),
    "si": (0.70, 0.01, 0.00, 0.03),
    "ca": (0.60, 0.00, 0.00, 0.035),
    "ti": (0.75, -0.01, 0.00, 0.04),
    "eu": (1.00, 0.05, -0.05, 0.08),
    "al": (0.90, 0.02, 0.00, 0.05),
    "sc": (0.45, 0.03, 0.00, 0.04),
}

#: extra offsets of the accreted halo (dex)
ACCRETED_OFFSETS = {"eu": 0.25, "al": -0.25, "mn": -0.10, "sc": -0.05, "o": -0.03}


def provisional_feh(population, age, rng):
    """A first [Fe/H] per star, before its position is known (used to place it on its track)."""
    population = np.asarray(population)
    age = np.asarray(age, float)
    feh = np.empty(len(population))
    for pop, mean, sd in (("thin", None, 0.20), ("thick", -0.45, 0.22),
                          ("halo_insitu", -0.75, 0.35), ("halo_accreted", -1.3, 0.35)):
        m = population == pop
        centre = 0.05 - 0.03 * (age[m] - 4.0) if mean is None else mean
        feh[m] = rng.normal(centre, sd)
    return np.clip(feh, *FEH_RANGE)


def alpha_enhancement(population, feh):
    """The alpha sequence value ``A`` (dex) of each star, without scatter."""
    population = np.asarray(population)
    feh = np.asarray(feh, float)
    low = np.clip(-0.17 * feh, -0.05, 0.15)
    high = np.where(feh < -0.65, 0.30, 0.30 - 0.244 * (feh + 0.65))
    acc = np.clip(np.where(feh < -1.9, 0.28, 0.28 - 0.30 * (feh + 1.9)), -0.10, 0.28)
    return np.select([population == "thin", population == "halo_accreted"], [low, acc], high)


def s_process(population, age, feh):
    """The s-process term (dex) shared by Ba and Y, before scatter."""
    population = np.asarray(population)
    age = np.asarray(age, float)
    feh = np.asarray(feh, float)
    thin = 0.30 - 0.045 * age - 0.30 * (feh + 0.15) ** 2
    thick = -0.02 - 0.20 * (feh + 0.3) ** 2
    return np.select([population == "thin", population == "thick",
                      population == "halo_insitu"], [thin, thick, np.zeros_like(feh)],
                     np.full_like(feh, 0.05))


def abundances(population, age, R, z, rng, feh=None) -> dict[str, np.ndarray]:
    """Draw ``fe_h`` and ``<x>_fe`` (x in :data:`lamostcannon.labels.ELEMENTS`) for each star.

    Parameters
    ----------
    population : (S,) str; one of ``thin, thick, halo_insitu, halo_accreted, cluster``
        (``cluster`` stars are drawn as thin-disk stars; callers overwrite them with one chemistry).
    age : (S,) Gyr
    R, z : (S,) current Galactocentric cylindrical radius and height (kpc)
    rng : numpy.random.Generator
    feh : (S,) dex, optional
        A given [Fe/H] (an open cluster's); the [X/Fe] then follow the recipe at that [Fe/H]
        (the [Fe/H] draws are made all the same, so the random stream does not depend on it).

    Returns
    -------
    dict with ``fe_h``, ``<x>_fe`` (dex) and ``R_birth`` (kpc, thin disk; R otherwise).
    """
    given = feh
    population = np.asarray(population).astype(str)
    population = np.where(population == "cluster", "thin", population)
    age = np.asarray(age, float)
    R = np.asarray(R, float)
    absz = np.abs(np.asarray(z, float))
    n = len(population)
    thin = population == "thin"
    R_b = R.copy()
    R_b[thin] = np.clip(R[thin] + rng.normal(0.0, 1.5 * np.sqrt(age[thin] / 10.0)), 0.5, None)

    feh = np.empty(n)
    feh[thin] = rng.normal(0.05 - 0.06 * (R_b[thin] - 8.0) - 0.03 * (age[thin] - 4.0)
                           - 0.10 * absz[thin], 0.12)
    m = population == "thick"
    feh[m] = rng.normal(-0.45 - 0.05 * absz[m] - 0.08 * (age[m] - 11.0), 0.22)
    m = population == "halo_insitu"
    feh[m] = rng.normal(-0.75, 0.35, int(m.sum()))
    m = population == "halo_accreted"
    feh[m] = rng.normal(-1.3, 0.35, int(m.sum()))
    feh = np.clip(feh, *FEH_RANGE)
    if given is not None:
        feh = np.broadcast_to(np.asarray(given, float), feh.shape).copy()

    A = alpha_enhancement(population, feh) + rng.normal(0.0, 0.025, n)
    acc = population == "halo_accreted"
    out = {"fe_h": feh}
    for x, (amp, off, slope, sd) in _ALPHA_LIKE.items():
        val = amp * A + off + slope * np.clip(feh, -1.0, 0.5)
        if x == "al":  # odd-Z: lower at low metallicity
            val += 0.15 * np.clip(feh + 1.0, -1.5, 0.0)
        if x == "eu":  # extra scatter at low metallicity (stochastic r-process events)
            sd = sd + 0.06 * np.clip(-feh - 1.0, 0.0, 1.0)
        val = val + rng.normal(0.0, sd, n) + np.where(acc, ACCRETED_OFFSETS.get(x, 0.0), 0.0)
        out[f"{x}_fe"] = val
    mn = 0.25 * np.clip(feh, -1.5, 0.5) - 0.30 * A + rng.normal(0.0, 0.04, n)
    out["mn_fe"] = mn + np.where(acc, ACCRETED_OFFSETS["mn"], 0.0)
    s = s_process(population, age, feh)
    s_sd = np.where(np.isin(population, ("halo_insitu", "halo_accreted")), 0.15, 0.07)
    out["ba_fe"] = s + rng.normal(0.0, s_sd)
    out["y_fe"] = 0.75 * s - 0.03 + rng.normal(0.0, s_sd)
    out = {"fe_h": out["fe_h"], **{f"{x}_fe": out[f"{x}_fe"] for x in ELEMENTS}}
    out["R_birth"] = R_b
    return out


def mean_alpha(table) -> np.ndarray:
    """Unweighted mean of the true [Mg, Si, Ca, Ti/Fe] (the truth analogue of ``alpha_fe``)."""
    return np.mean([np.asarray(table[f"{x}_fe"], float) for x in ALPHA_ELEMENTS], axis=0)
