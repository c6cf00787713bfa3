"""The atomic and molecular line data behind the mock spectra (:mod:`lamostcannon.mock.synth`).

The line list is one package file, ``lamostcannon/data/linelist.csv``; regenerate it with
``python -m lamostcannon.mock.linelist`` (deterministic; the empirical part needs the real LAMOST
DR10 folder, :func:`lamostcannon.paths.real_lamost_dir`). Column ``source`` says where a line
comes from:

``known``
    Strong and well-known lines at their laboratory air wavelengths (Ca II H&K and the infrared
    triplet, Mg b, Na D, Ca I 4227, the strongest Fe I/II, Ti I/II, Sr II, Ba II, Y II, Eu II,
    Mn I, Cr I, Al I, Si I/II, O I, K I, Li I ...) with approximate excitation potentials ``chi``
    (eV) and oscillator strengths ``loggf`` recalled from the standard compilations (VALD, NIST;
    good to a few tenths of a dex, which is all a mock needs). Damped (``wide``) lines carry an
    approximate solar equivalent width ``ew_sun`` (A; solar atlas literature, e.g. Moore et al.
    1966; Ca II H&K set to the effective values that match LAMOST composites) that fixes their
    van der Waals damping enhancement.
``window``
    One line at the centre of every GALAH line window of the paper's Table 2 (Wheeler et al. 2020,
    appendix C) that holds no known line, with the window's element. The windows are centred on the
    GALAH lines, so the midpoint is the line wavelength to ~0.05 A; ``chi`` is drawn from the
    species' typical range and ``loggf`` is set so that the line has a solar equivalent width
    typical of GALAH lines (20-90 mA, drawn reproducibly).
``empirical``
    The weak-line forest between 3800 and 9000 A: absorption components found by a CLEAN
    decomposition of a composite of real LAMOST DR10 solar-type dwarfs (even obsids only; the odd
    ones are held out for the realism tests), divided by the mock of the known and window lines.
    Each component (a blend at R ~ 1400) gets the species and ``chi`` (from the pseudo-random
    forest's species and ranges) whose temperature and gravity response, in the generator's
    physics, best reproduces its strength in three more even-obsid composites (K dwarfs, K giants,
    F dwarfs; :data:`RESPONSE_COMPOSITES`; drawn at random where it is too weak to measure), and
    the ``loggf`` that reproduces its equivalent width in the G-dwarf composite. Used at low
    resolution only.
``forest``
    A documented pseudo-random forest of weak iron-group and other metal lines (Fe I/II, Ti I/II,
    Cr I, Ni I, V I, Mn I, Co I, Ca I, Sc II, Si I, Mg I, Na I, Zr II, Ce II, Nd II, C I) where the
    empirical forest cannot be measured (below 3800 A, above 8940 A, telluric bands, the dichroic
    overlap, sky-line residuals; :data:`EMPIRICAL_MASK`), or everywhere with ``forest="random"``.
    Its density falls as lambda^-3.5 (dense in the blue, as in the solar spectrum), excitation
    potentials come from typical ranges per species, and ``loggf`` is set so that solar equivalent
    widths follow dN/dlog W ~ W^-0.5 between 2 and 150 mA. The seed is fixed (one mock Sun).

Hydrogen lines (Balmer H-alpha to H16 and Paschen P10-P16) and molecular bands (CN, CH G band, MgH,
TiO, CaH) are tabulated separately in :data:`HYDROGEN_LINES` and :data:`MOLECULAR_BANDS`.

All wavelengths here are air (as in the atlases and in the paper's Table 2); the list stores both
``wave_air`` and ``wave_vac`` (Angstrom), using :func:`air_to_vacuum` (the Morton 2000/VALD
formula). LAMOST works in vacuum, GALAH in air.

The empirical forest is derived from public LAMOST data (Guoshoujing Telescope); see
https://www.lamost.org/policies/ for the acknowledgement its use requires.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

# The GALAH line windows (air, Angstrom; the paper's Table 2) live in one place, cleaning.
from ..cleaning import GALAH_WINDOWS

log = logging.getLogger(__name__)

#: Seed of the pseudo-random forest and of the window-line strengths (fixed: one mock Sun).
FOREST_SEED = 20200701

#: Solar photospheric abundances log eps (H = 12), Asplund et al. 2009.
SOLAR_ABUNDANCE = {
    "H": 12.00, "Li": 1.05, "C": 8.43, "N": 7.83, "O": 8.69, "Na": 6.24, "Mg": 7.60, "Al": 6.45,
    "Si": 7.51, "K": 5.03, "Ca": 6.34, "Sc": 3.15, "Ti": 4.95, "V": 3.93, "Cr": 5.64, "Mn": 5.43,
    "Fe": 7.50, "Co": 4.99, "Ni": 6.22, "Cu": 4.19, "Zn": 4.56, "Sr": 2.87, "Y": 2.21, "Zr": 2.58,
    "Ba": 2.18, "La": 1.10, "Ce": 1.58, "Nd": 1.42, "Eu": 0.52,
}

#: First and second ionisation potentials (eV), NIST.
IONISATION = {
    "H": (13.60, 99.0), "Li": (5.39, 75.6), "C": (11.26, 24.38), "N": (14.53, 29.60),
    "O": (13.62, 35.12), "Na": (5.14, 47.29), "Mg": (7.65, 15.04), "Al": (5.99, 18.83),
    "Si": (8.15, 16.35), "K": (4.34, 31.63), "Ca": (6.11, 11.87), "Sc": (6.56, 12.80),
    "Ti": (6.83, 13.58), "V": (6.75, 14.62), "Cr": (6.77, 16.49), "Mn": (7.43, 15.64),
    "Fe": (7.90, 16.19), "Co": (7.88, 17.08), "Ni": (7.64, 18.17), "Cu": (7.73, 20.29),
    "Zn": (9.39, 17.96), "Sr": (5.69, 11.03), "Y": (6.22, 12.24), "Zr": (6.63, 13.13),
    "Ba": (5.21, 10.00), "La": (5.58, 11.06), "Ce": (5.54, 10.85), "Nd": (5.53, 10.73),
    "Eu": (5.67, 11.24),
}

#: Representative partition functions (U_I, U_II, U_III) near 5000 K (Gray 2005, appendix D;
#: held constant with temperature).
PARTITION = {
    "H": (2.0, 1.0, 1.0), "Li": (2.1, 1.0, 1.0), "C": (9.3, 5.9, 1.0), "N": (4.0, 9.0, 6.0),
    "O": (8.9, 4.0, 9.0), "Na": (2.0, 1.0, 6.0), "Mg": (1.0, 2.0, 1.0), "Al": (5.9, 1.0, 2.0),
    "Si": (9.5, 5.7, 1.0), "K": (2.1, 1.0, 4.0), "Ca": (1.2, 2.2, 1.0), "Sc": (10.0, 21.0, 10.0),
    "Ti": (30.0, 55.0, 25.0), "V": (35.0, 30.0, 25.0), "Cr": (9.5, 6.8, 20.0),
    "Mn": (6.5, 7.5, 10.0), "Fe": (28.0, 45.0, 25.0), "Co": (30.0, 28.0, 25.0),
    "Ni": (29.0, 9.5, 20.0), "Cu": (2.3, 1.0, 1.0), "Zn": (1.0, 2.0, 1.0), "Sr": (1.3, 2.0, 1.0),
    "Y": (11.0, 12.0, 10.0), "Zr": (35.0, 45.0, 30.0), "Ba": (3.0, 3.2, 1.0),
    "La": (35.0, 25.0, 15.0), "Ce": (150.0, 100.0, 50.0), "Nd": (150.0, 100.0, 50.0),
    "Eu": (9.0, 11.0, 8.0),
}

#: Atomic masses (u), for thermal Doppler widths.
ATOMIC_MASS = {
    "H": 1.008, "Li": 6.94, "C": 12.01, "N": 14.01, "O": 16.00, "Na": 22.99, "Mg": 24.31,
    "Al": 26.98, "Si": 28.09, "K": 39.10, "Ca": 40.08, "Sc": 44.96, "Ti": 47.87, "V": 50.94,
    "Cr": 52.00, "Mn": 54.94, "Fe": 55.85, "Co": 58.93, "Ni": 58.69, "Cu": 63.55, "Zn": 65.38,
    "Sr": 87.62, "Y": 88.91, "Zr": 91.22, "Ba": 137.33, "La": 138.91, "Ce": 140.12, "Nd": 144.24,
    "Eu": 151.96,
}


# Known lines: (species, air wavelength A, chi eV, log gf, solar EW A or None).
# A solar EW marks a strongly damped ("wide") line whose damping constant is calibrated on it.
KNOWN_LINES = [
    # calcium
    ("Ca II", 3933.66, 0.00, 0.13, 14.0), ("Ca II", 3968.47, 0.00, -0.18, 10.5),
    ("Ca II", 8498.02, 1.69, -1.42, 1.4), ("Ca II", 8542.09, 1.70, -0.46, 3.6),
    ("Ca II", 8662.14, 1.69, -0.72, 2.6),
    ("Ca I", 4226.73, 0.00, 0.24, 1.5), ("Ca I", 4454.78, 1.90, 0.26, None),
    ("Ca I", 4434.96, 1.89, -0.01, None), ("Ca I", 4425.44, 1.88, -0.36, None),
    ("Ca I", 5588.75, 2.53, 0.21, None), ("Ca I", 6102.72, 1.88, -0.79, None),
    ("Ca I", 6122.22, 1.89, -0.32, None), ("Ca I", 6162.17, 1.90, -0.09, None),
    ("Ca I", 6439.08, 2.53, 0.47, None), ("Ca I", 6449.81, 2.52, -0.50, None),
    ("Ca I", 6462.57, 2.52, 0.26, None), ("Ca I", 6717.68, 2.71, -0.52, None),
    ("Ca I", 5857.45, 2.93, 0.24, None), ("Ca I", 5867.56, 2.93, -1.57, None),
    ("Ca I", 6493.78, 2.52, -0.11, None), ("Ca I", 6499.65, 2.52, -0.82, None),
    ("Ca I", 6508.85, 2.53, -2.41, None), ("Ca I", 4302.53, 1.90, 0.28, None),
    ("Ca I", 4318.65, 1.90, -0.21, None), ("Ca I", 5349.47, 2.71, -0.31, None),
    ("Ca I", 5581.97, 2.52, -0.56, None), ("Ca I", 5590.11, 2.52, -0.57, None),
    ("Ca I", 5594.46, 2.52, 0.10, None), ("Ca I", 5598.48, 2.52, -0.09, None),
    ("Ca I", 5601.28, 2.53, -0.52, None), ("Ca I", 5261.70, 2.52, -0.58, None),
    ("Ca I", 5262.24, 2.52, -0.47, None), ("Ca I", 5265.56, 2.52, -0.26, None),
    ("Ca I", 5270.27, 2.53, 0.16, None), ("Ca I", 6166.44, 2.52, -1.14, None),
    ("Ca I", 6169.04, 2.52, -0.80, None), ("Ca I", 6169.56, 2.53, -0.48, None),
    # magnesium
    ("Mg I", 5167.32, 2.71, -0.93, 0.94), ("Mg I", 5172.68, 2.71, -0.45, 1.26),
    ("Mg I", 5183.60, 2.72, -0.24, 1.58), ("Mg I", 5528.41, 4.35, -0.50, 0.29),
    ("Mg I", 4702.99, 4.35, -0.44, None), ("Mg I", 4571.10, 0.00, -5.62, None),
    ("Mg I", 3829.35, 2.71, -0.21, 1.1), ("Mg I", 3832.30, 2.71, 0.27, 1.7),
    ("Mg I", 3838.29, 2.72, 0.49, 1.9), ("Mg I", 8806.76, 4.35, -0.14, 0.55),
    ("Mg I", 8736.02, 5.95, -0.36, None), ("Mg I", 8717.83, 5.93, -0.97, None),
    ("Mg I", 8923.57, 5.39, -1.68, None), ("Mg I", 5711.09, 4.35, -1.72, None),
    ("Mg I", 4730.03, 4.35, -2.35, None), ("Mg I", 4167.27, 4.35, -0.71, None),
    ("Mg I", 4057.51, 4.35, -0.90, None), ("Mg I", 4351.91, 4.35, -0.53, None),
    ("Mg II", 4481.13, 8.86, 0.74, None), ("Mg I", 7657.60, 5.11, -1.28, None),
    # sodium, potassium, lithium
    ("Na I", 5889.95, 0.00, 0.11, 0.75), ("Na I", 5895.92, 0.00, -0.19, 0.56),
    ("Na I", 8183.26, 2.10, 0.24, 0.27), ("Na I", 8194.82, 2.10, 0.49, 0.31),
    ("Na I", 5682.63, 2.10, -0.71, None), ("Na I", 5688.20, 2.10, -0.45, None),
    ("Na I", 6154.23, 2.10, -1.55, None), ("Na I", 6160.75, 2.10, -1.25, None),
    ("Na I", 4751.82, 2.10, -2.08, None),
    ("K I", 7664.90, 0.00, 0.13, None), ("K I", 7698.96, 0.00, -0.17, None),
    ("Li I", 6707.76, 0.00, 0.17, None),
    # aluminium, silicon, oxygen, carbon
    ("Al I", 3944.01, 0.00, -0.64, None), ("Al I", 3961.52, 0.01, -0.34, None),
    ("Al I", 6696.02, 3.14, -1.35, None), ("Al I", 6698.67, 3.14, -1.65, None),
    ("Al I", 7835.31, 4.02, -0.65, None), ("Al I", 7836.13, 4.02, -0.45, None),
    ("Al I", 8772.87, 4.02, -0.32, None), ("Al I", 8773.90, 4.02, -0.16, None),
    ("Si I", 3905.52, 1.91, -1.09, None), ("Si I", 5665.55, 4.92, -2.04, None),
    ("Si I", 5690.43, 4.93, -1.87, None), ("Si I", 5701.10, 4.93, -2.05, None),
    ("Si I", 5793.07, 4.93, -2.06, None), ("Si I", 5708.40, 4.95, -1.47, None),
    ("Si I", 5772.15, 5.08, -1.65, None), ("Si I", 5948.54, 5.08, -1.13, None),
    ("Si I", 6155.13, 5.62, -0.75, None), ("Si I", 7405.77, 5.61, -0.31, None),
    ("Si I", 7415.95, 5.61, -0.73, None), ("Si I", 7423.50, 5.62, -0.58, None),
    ("Si I", 7034.90, 5.87, -0.88, None), ("Si I", 7944.00, 5.98, -0.31, None),
    ("Si II", 6347.11, 8.12, 0.15, None), ("Si II", 6371.37, 8.12, -0.08, None),
    ("Si II", 4128.07, 9.84, 0.36, None), ("Si II", 4130.89, 9.84, 0.55, None),
    ("Si II", 3856.02, 6.86, -0.41, None), ("Si II", 3862.60, 6.86, -0.76, None),
    ("O I", 7771.94, 9.15, 0.37, None), ("O I", 7774.17, 9.15, 0.22, None),
    ("O I", 7775.39, 9.15, 0.00, None), ("O I", 6300.30, 0.00, -9.72, None),
    ("O I", 6363.78, 0.02, -10.19, None), ("O I", 8446.36, 9.52, 0.17, None),
    ("O I", 9265.83, 10.74, 0.82, None),
    ("C I", 9078.29, 7.48, -0.58, None), ("C I", 9088.51, 7.48, -0.43, None),
    ("C I", 9094.83, 7.49, 0.15, None), ("C I", 8335.15, 7.68, -0.44, None),
    ("C I", 7111.47, 8.64, -1.09, None), ("C I", 5380.34, 7.68, -1.62, None),
    # iron
    ("Fe I", 3734.86, 0.86, 0.32, 3.0), ("Fe I", 3737.13, 0.05, -0.57, 2.6),
    ("Fe I", 3745.56, 0.09, -0.77, 1.5), ("Fe I", 3749.49, 0.92, 0.16, 1.9),
    ("Fe I", 3758.23, 0.96, -0.03, 1.4), ("Fe I", 3763.79, 0.99, -0.22, 1.0),
    ("Fe I", 3815.84, 1.48, 0.24, 1.3), ("Fe I", 3820.43, 0.86, 0.12, 1.7),
    ("Fe I", 3825.88, 0.92, -0.04, 1.5), ("Fe I", 3859.91, 0.00, -0.71, 1.6),
    ("Fe I", 3886.28, 0.05, -1.08, 0.9), ("Fe I", 3899.71, 0.09, -1.53, 0.6),
    ("Fe I", 3920.26, 0.12, -1.75, 0.4), ("Fe I", 3922.91, 0.05, -1.65, 0.5),
    ("Fe I", 4045.81, 1.49, 0.28, 1.17), ("Fe I", 4063.59, 1.56, 0.06, 0.79),
    ("Fe I", 4071.74, 1.61, -0.02, 0.72), ("Fe I", 4143.87, 1.56, -0.51, 0.47),
    ("Fe I", 4202.03, 1.49, -0.71, 0.33), ("Fe I", 4260.47, 2.40, 0.08, 0.40),
    ("Fe I", 4271.76, 1.49, -0.16, 0.76), ("Fe I", 4325.76, 1.61, 0.01, 0.80),
    ("Fe I", 4383.54, 1.48, 0.20, 1.01), ("Fe I", 4404.75, 1.56, -0.14, 0.90),
    ("Fe I", 4415.12, 1.61, -0.62, 0.42), ("Fe I", 4528.61, 2.18, -0.82, None),
    ("Fe I", 4957.60, 2.81, 0.23, 0.45), ("Fe I", 4920.50, 2.83, 0.07, 0.43),
    ("Fe I", 4891.49, 2.85, -0.11, 0.31), ("Fe I", 5227.19, 1.56, -1.23, 0.38),
    ("Fe I", 5232.94, 2.94, -0.06, 0.35), ("Fe I", 5269.54, 0.86, -1.32, 0.48),
    ("Fe I", 5328.04, 0.92, -1.47, 0.38), ("Fe I", 5371.49, 0.96, -1.65, 0.30),
    ("Fe I", 5397.13, 0.92, -1.99, 0.24), ("Fe I", 5405.77, 0.99, -1.84, 0.27),
    ("Fe I", 5429.70, 0.96, -1.88, 0.28), ("Fe I", 5446.92, 0.99, -1.91, 0.25),
    ("Fe I", 5455.61, 1.01, -2.09, 0.22), ("Fe I", 5324.18, 3.21, -0.10, 0.33),
    ("Fe I", 5615.64, 3.33, 0.05, 0.26), ("Fe I", 6136.61, 2.45, -1.40, None),
    ("Fe I", 6191.56, 2.43, -1.42, None), ("Fe I", 6230.72, 2.56, -1.28, None),
    ("Fe I", 6252.56, 2.40, -1.69, None), ("Fe I", 6393.60, 2.43, -1.43, None),
    ("Fe I", 6400.00, 3.60, -0.29, None), ("Fe I", 6494.98, 2.40, -1.27, None),
    ("Fe I", 6546.24, 2.76, -1.54, None), ("Fe I", 6592.91, 2.73, -1.47, None),
    ("Fe I", 6677.99, 2.69, -1.42, None), ("Fe I", 6151.62, 2.18, -3.30, None),
    ("Fe I", 6240.65, 2.22, -3.23, None), ("Fe I", 8327.05, 2.20, -1.53, None),
    ("Fe I", 8387.77, 2.18, -1.49, None), ("Fe I", 8468.41, 2.22, -2.07, None),
    ("Fe I", 8514.07, 2.20, -2.23, None), ("Fe I", 8688.62, 2.18, -1.21, None),
    ("Fe I", 8824.22, 2.20, -1.54, None), ("Fe I", 7511.02, 4.18, 0.12, None),
    ("Fe I", 7495.07, 4.22, -0.10, None), ("Fe I", 5383.37, 4.31, 0.65, None),
    ("Fe I", 5586.76, 3.37, -0.14, None), ("Fe I", 5572.84, 3.40, -0.28, None),
    ("Fe I", 5569.62, 3.42, -0.54, None), ("Fe I", 5424.07, 4.32, 0.52, None),
    ("Fe I", 4235.94, 2.43, -0.33, None), ("Fe I", 4250.79, 1.56, -0.71, None),
    ("Fe I", 4307.90, 1.56, -0.07, 0.9), ("Fe I", 4461.65, 0.09, -3.21, None),
    ("Fe I", 4466.55, 2.83, -0.60, None), ("Fe I", 4494.56, 2.20, -1.14, None),
    ("Fe II", 4923.93, 2.89, -1.32, None), ("Fe II", 5018.44, 2.89, -1.22, None),
    ("Fe II", 5169.03, 2.89, -1.30, None), ("Fe II", 5316.62, 3.15, -1.85, None),
    ("Fe II", 4233.17, 2.58, -1.90, None), ("Fe II", 4583.84, 2.81, -1.86, None),
    ("Fe II", 5197.58, 3.23, -2.10, None), ("Fe II", 5234.62, 3.22, -2.05, None),
    ("Fe II", 6147.74, 3.89, -2.72, None), ("Fe II", 6149.26, 3.89, -2.72, None),
    ("Fe II", 6456.38, 3.90, -2.10, None), ("Fe II", 6516.08, 2.89, -3.31, None),
    ("Fe II", 4549.47, 2.83, -1.75, None), ("Fe II", 4555.89, 2.83, -2.29, None),
    # titanium, scandium, vanadium, chromium, manganese, nickel, cobalt
    ("Ti II", 3759.29, 0.61, 0.28, None), ("Ti II", 3761.32, 0.57, 0.18, None),
    ("Ti II", 4395.03, 1.08, -0.54, None), ("Ti II", 4443.80, 1.08, -0.72, None),
    ("Ti II", 4468.49, 1.13, -0.60, None), ("Ti II", 4501.27, 1.12, -0.77, None),
    ("Ti II", 4563.76, 1.22, -0.69, None), ("Ti II", 4571.97, 1.57, -0.31, None),
    ("Ti II", 4549.62, 1.58, -0.22, None), ("Ti II", 4533.96, 1.24, -0.53, None),
    ("Ti I", 4981.73, 0.85, 0.56, None), ("Ti I", 4991.07, 0.84, 0.45, None),
    ("Ti I", 4999.50, 0.83, 0.31, None), ("Ti I", 5007.21, 0.82, 0.17, None),
    ("Ti I", 5014.28, 0.81, 0.11, None), ("Ti I", 5210.39, 0.05, -0.82, None),
    ("Ti I", 5192.97, 0.02, -0.95, None), ("Ti I", 5173.74, 0.00, -1.06, None),
    ("Ti I", 4533.24, 0.85, 0.53, None), ("Ti I", 4534.78, 0.84, 0.34, None),
    ("Ti I", 4535.57, 0.83, 0.12, None), ("Ti I", 4536.05, 0.83, 0.03, None),
    ("Ti I", 8426.51, 0.83, -1.20, None), ("Ti I", 8434.96, 0.85, -0.83, None),
    ("Sc II", 4246.82, 0.31, 0.24, None), ("Sc II", 5526.79, 1.77, 0.02, None),
    ("Sc II", 4314.08, 0.62, -0.10, None), ("Sc II", 4320.73, 0.61, -0.25, None),
    ("V I", 4379.23, 0.30, 0.58, None), ("V I", 4389.97, 0.28, 0.20, None),
    ("Cr I", 4254.33, 0.00, -0.11, 0.39), ("Cr I", 4274.80, 0.00, -0.23, 0.33),
    ("Cr I", 4289.72, 0.00, -0.36, 0.29), ("Cr I", 5204.51, 0.94, -0.21, None),
    ("Cr I", 5206.04, 0.94, 0.02, None), ("Cr I", 5208.42, 0.94, 0.16, None),
    ("Mn I", 4030.75, 0.00, -0.50, 0.40), ("Mn I", 4033.06, 0.00, -0.62, 0.33),
    ("Mn I", 4034.48, 0.00, -0.81, 0.26), ("Mn I", 4754.04, 2.28, -0.09, None),
    ("Mn I", 4823.52, 2.32, 0.14, None), ("Mn I", 6013.49, 3.07, -0.25, None),
    ("Mn I", 6016.64, 3.07, -0.10, None), ("Mn I", 6021.80, 3.08, 0.03, None),
    ("Ni I", 5476.90, 1.83, -0.89, None), ("Ni I", 5035.36, 3.63, 0.29, None),
    ("Ni I", 5080.53, 3.65, 0.13, None), ("Ni I", 5081.11, 3.85, 0.30, None),
    ("Ni I", 6767.77, 1.83, -2.17, None), ("Ni I", 7788.94, 1.95, -2.42, None),
    ("Ni I", 3858.30, 0.42, -0.95, None), ("Co I", 3845.47, 0.92, 0.01, None),
    ("Co I", 4121.31, 0.92, -0.32, None),
    # neutron-capture elements and others
    ("Sr II", 4077.71, 0.00, 0.15, 0.43), ("Sr II", 4215.52, 0.00, -0.17, 0.30),
    # Ba II: log gf lowered by 0.6 dex from the laboratory values, an effective value that with the
    # hyperfine/isotopic width of synth.HYPERFINE keeps the lines' strength and restores their
    # sensitivity to [Ba/Fe] in giants (issue 13: real giants show ~3x the mock's star-to-star
    # variation at Ba II 4554 at fixed teff, logg, [Fe/H]).
    ("Ba II", 4554.03, 0.00, -0.43, None), ("Ba II", 4934.08, 0.00, -0.75, None),
    ("Ba II", 5853.67, 0.60, -1.60, None), ("Ba II", 6141.71, 0.70, -0.68, None),
    ("Ba II", 6496.90, 0.60, -0.98, None),
    ("Y II", 4883.68, 1.08, 0.07, None), ("Y II", 4854.86, 0.99, -0.38, None),
    ("Y II", 5662.93, 1.94, 0.16, None), ("Y II", 5728.89, 1.84, -1.12, None),
    ("Y II", 4900.12, 1.03, -0.09, None), ("Y II", 5087.42, 1.08, -0.17, None),
    ("Y II", 4374.93, 0.41, 0.16, None), ("Y II", 3774.33, 0.13, 0.21, None),
    ("Y II", 3788.69, 0.10, -0.07, None),
    ("Eu II", 4129.72, 0.00, 0.22, None), ("Eu II", 4205.04, 0.00, 0.21, None),
    ("Eu II", 6645.10, 1.38, 0.12, None), ("Eu II", 5818.74, 1.25, -0.32, None),
    ("Eu II", 6437.64, 1.32, -0.32, None), ("Eu II", 3819.67, 0.00, 0.51, None),
    ("Zr II", 4149.20, 0.80, -0.04, None), ("La II", 4086.71, 0.00, -0.07, None),
    ("Ce II", 4137.65, 0.52, 0.44, None), ("Nd II", 4061.08, 0.47, 0.55, None),
]

# Hydrogen lines: (name, air wavelength A, lower level n, upper level n, oscillator strength f).
HYDROGEN_LINES = [
    ("H-alpha", 6562.80, 2, 3, 0.6407), ("H-beta", 4861.33, 2, 4, 0.1193),
    ("H-gamma", 4340.46, 2, 5, 0.04467), ("H-delta", 4101.73, 2, 6, 0.02209),
    ("H-epsilon", 3970.07, 2, 7, 0.01270), ("H8", 3889.05, 2, 8, 0.008036),
    ("H9", 3835.38, 2, 9, 0.005429), ("H10", 3797.90, 2, 10, 0.003851),
    ("H11", 3770.63, 2, 11, 0.002835), ("H12", 3750.15, 2, 12, 0.002151),
    ("H13", 3734.37, 2, 13, 0.001672), ("H14", 3721.94, 2, 14, 0.001326),
    ("H15", 3711.97, 2, 15, 0.001070), ("H16", 3703.86, 2, 16, 0.000876),
    ("P10", 9014.91, 3, 10, 0.00559), ("P11", 8862.78, 3, 11, 0.00420),
    ("P12", 8750.47, 3, 12, 0.00324), ("P13", 8665.02, 3, 13, 0.00254),
    ("P14", 8598.39, 3, 14, 0.00203), ("P15", 8545.38, 3, 15, 0.00165),
    ("P16", 8502.48, 3, 16, 0.00136),
]

# Molecular bands: (name, molecule, constituent elements, head (air A), degradation +1 = to the red
# (absorption starts at the head and fades redward) / -1 = to the violet, e-folding length (A),
# relative strength (log), effective dissociation + excitation energy D (eV) in the
# Saha-Boltzmann-like temperature factor 10^(D (theta - theta_ref)), theta_ref, gravity slope).
# The strengths and temperature factors of CN, CH and MgH are calibrated on the real DR10 stars
# cooler than 5400 K with EVEN obsid (K dwarfs and giants; lamostcannon.realism.fit_band_strengths:
# mock twins at their LASP labels, the same continuum normalisation, 8 damped iterations, with the
# saturation of synth.BAND_SATURATION): CN is much less temperature-sensitive than first guessed
# and MgH 4780 is not detected in the real K dwarfs (its strength runs away to zero; it keeps
# MgH 5211's D, one molecule, so that it appears in M dwarfs). TiO and CaH (below ~4000 K, no
# calibration stars) are unchanged.
MOLECULAR_BANDS = [
    ("CN 3883", "CN", ("C", "N"), 3883.0, -1, 35.0, -0.34, 2.85, 0.87, -0.25),
    ("CN 4216", "CN", ("C", "N"), 4216.0, -1, 45.0, -1.35, 1.44, 0.87, -0.25),
    ("CN 7874", "CN", ("C", "N"), 7874.0, +1, 120.0, -2.33, 1.0, 0.87, -0.25),
    ("CN 8100", "CN", ("C", "N"), 8100.0, +1, 150.0, -3.0, 1.0, 0.87, -0.25),
    ("CH G band", "CH", ("C",), 4314.0, -1, 28.0, -0.39, 3.36, 0.87, 0.15),
    ("MgH 5211", "MgH", ("Mg",), 5211.0, -1, 90.0, -0.17, 7.95, 1.12, 0.6),
    ("MgH 4780", "MgH", ("Mg",), 4780.0, -1, 60.0, -2.8, 7.95, 1.12, 0.6),
    ("TiO 4761", "TiO", ("Ti", "O"), 4761.0, +1, 60.0, -0.4, 9.0, 1.40, 0.1),
    ("TiO 4954", "TiO", ("Ti", "O"), 4954.0, +1, 70.0, -0.2, 9.0, 1.40, 0.1),
    ("TiO 5167", "TiO", ("Ti", "O"), 5167.0, +1, 80.0, -0.1, 9.0, 1.40, 0.1),
    ("TiO 5448", "TiO", ("Ti", "O"), 5448.0, +1, 60.0, -0.3, 9.0, 1.40, 0.1),
    ("TiO 5847", "TiO", ("Ti", "O"), 5847.0, +1, 90.0, -0.1, 9.0, 1.40, 0.1),
    ("TiO 6159", "TiO", ("Ti", "O"), 6159.0, +1, 110.0, 0.0, 9.0, 1.40, 0.1),
    ("TiO 6651", "TiO", ("Ti", "O"), 6651.0, +1, 90.0, -0.2, 9.0, 1.40, 0.1),
    ("TiO 7054", "TiO", ("Ti", "O"), 7054.0, +1, 130.0, 0.15, 9.0, 1.40, 0.1),
    ("TiO 7589", "TiO", ("Ti", "O"), 7589.0, +1, 100.0, -0.3, 9.0, 1.40, 0.1),
    ("TiO 8432", "TiO", ("Ti", "O"), 8432.0, +1, 110.0, -0.5, 9.0, 1.40, 0.1),
    ("TiO 8860", "TiO", ("Ti", "O"), 8860.0, +1, 100.0, -0.6, 9.0, 1.40, 0.1),
    ("CaH 6382", "CaH", ("Ca",), 6382.0, +1, 50.0, -0.6, 6.0, 1.33, 0.8),
    ("CaH 6750", "CaH", ("Ca",), 6750.0, +1, 80.0, -0.8, 6.0, 1.33, 0.8),
]

# Stage, species and typical chi range for the window lines without known atomic data.
_WINDOW_STAGE = {
    "al": "Al I", "ba": "Ba II", "ca": "Ca I", "co": "Co I", "cr": "Cr I", "cu": "Cu I",
    "eu": "Eu II", "k": "K I", "la": "La II", "li": "Li I", "mg": "Mg I", "mn": "Mn I",
    "na": "Na I", "ni": "Ni I", "o": "O I", "sc": "Sc I", "si": "Si I", "ti": "Ti I", "v": "V I",
    "y": "Y II", "zn": "Zn I",
}
# Window lines of the ionised stage where the element's default is neutral (known from the atlas).
_IONISED_WINDOW_LINES = {
    ("sc", 5657.90), ("sc", 5667.11), ("sc", 5684.16), ("sc", 6604.68), ("ti", 4764.61),
    ("ti", 4798.49), ("ti", 4865.56), ("ti", 4874.04), ("ti", 4849.23), ("cr", 4848.15),
}
_TYPICAL_CHI = {"al": (3.1, 4.1), "ba": (0.6, 2.5), "ca": (1.9, 3.0), "co": (1.7, 3.6),
                "cr": (1.0, 3.5), "cu": (1.4, 1.7), "eu": (1.2, 1.4), "k": (0.0, 0.1),
                "la": (0.0, 1.0), "li": (0.0, 0.1), "mg": (4.3, 5.1), "mn": (2.1, 3.1),
                "na": (2.1, 3.2), "ni": (1.7, 4.3), "o": (9.1, 9.2), "sc": (0.0, 1.8),
                "si": (4.9, 6.0), "ti": (0.0, 2.3), "v": (0.0, 2.4), "y": (1.0, 2.0),
                "zn": (4.0, 4.1)}

# Forest species: (species, weight, chi range eV).
_FOREST_SPECIES = [
    ("Fe I", 0.42, (0.0, 5.0)), ("Fe II", 0.05, (2.5, 4.0)), ("Ti I", 0.07, (0.0, 2.5)),
    ("Ti II", 0.04, (0.5, 3.0)), ("Cr I", 0.07, (0.5, 4.0)), ("Ni I", 0.07, (1.5, 4.5)),
    ("V I", 0.04, (0.0, 2.5)), ("Mn I", 0.02, (2.0, 4.5)), ("Co I", 0.04, (0.5, 4.0)),
    ("Ca I", 0.03, (1.9, 4.5)), ("Sc II", 0.02, (0.3, 2.0)), ("Si I", 0.03, (4.9, 6.2)),
    ("Mg I", 0.01, (4.3, 6.5)), ("Na I", 0.005, (2.1, 4.3)), ("Zr II", 0.02, (0.0, 1.5)),
    ("Ce II", 0.02, (0.0, 1.5)), ("Nd II", 0.02, (0.0, 1.5)), ("C I", 0.005, (7.5, 9.0)),
]

#: Wavelength range (air, A) covered by the list: LAMOST's 3700-9100 A plus margin for rv shifts.
LIST_RANGE = (3680.0, 9140.0)


def air_to_vacuum(wave_air):
    """Air to vacuum wavelength (Angstrom), the VALD/Morton (2000) formula (valid above 2000 A)."""
    wave_air = np.asarray(wave_air, dtype=float)
    s2 = (1e4 / wave_air) ** 2
    n = (1 + 0.00008336624212083 + 0.02408926869968 / (130.1065924522 - s2)
         + 0.0001599740894897 / (38.92568793293 - s2))
    return wave_air * n


def vacuum_to_air(wave_vac):
    """Vacuum to air wavelength (Angstrom), the Morton (2000) formula (inverse of air_to_vacuum
    to ~1e-4 A)."""
    wave_vac = np.asarray(wave_vac, dtype=float)
    s2 = (1e4 / wave_vac) ** 2
    n = 1 + 0.0000834254 + 0.02406147 / (130 - s2) + 0.00015998 / (38.9 - s2)
    return wave_vac / n


def split_species(species: str) -> tuple[str, int]:
    """``"Fe II"`` -> (``"Fe"``, 2)."""
    element, stage = species.split()
    return element, {"I": 1, "II": 2, "III": 3}[stage]


def _forest_density(wave):
    """Forest lines per Angstrom (before thinning), falling as lambda^-3.5 from the blue."""
    return 2.6 * (np.asarray(wave) / 4000.0) ** -3.5


#: Regions (air A) where no empirical forest line is placed: tellurics, sky residuals, the
#: dichroic overlap, and the surroundings of hydrogen and damped lines (modelled explicitly).
EMPIRICAL_MASK = [(3680.0, 3800.0), (5570.0, 5585.0), (5800.0, 5950.0), (6295.0, 6305.0),
                  (6860.0, 6960.0), (7160.0, 7340.0), (7590.0, 7700.0), (8120.0, 8350.0),
                  (8940.0, 9140.0)]

#: The calibration set of the empirical forest: LAMOST DR10 solar-type dwarfs with EVEN obsid.
#: Spectra with odd obsid are held out for the realism tests.
EMPIRICAL_SELECTION = {"teff": (5500.0, 6100.0), "logg_min": 4.1, "feh": (-0.35, 0.25),
                       "snrg_min": 50.0}


def _composite(lamost_dir, sel):
    """Median continuum-normalised spectrum (common grid) of the EVEN-obsid DR10 stars within
    ``sel`` (``teff``, ``logg``, ``feh`` ranges, ``snrg_min``), and its median labels (with the
    mock's vmic for them)."""
    import pandas as pd

    from .. import spectra
    from . import synth

    cat = pd.read_csv(lamost_dir / "dr10" / "catalog.csv")
    use = (cat.teff.between(*sel["teff"]) & cat.logg.between(*sel["logg"])
           & cat.feh.between(*sel["feh"]) & (cat.snrg > sel["snrg_min"]) & (cat.obsid % 2 == 0))
    rows = cat[use]
    if len(rows) < 5:
        raise ValueError(f"only {len(rows)} even-obsid DR10 stars in {sel}")
    flux = []
    for name in rows.filename:
        f, iv = spectra.resample(spectra.read_lamost(lamost_dir / "dr10" / name))
        good = (iv > 0).astype(float)
        cont = spectra.continuum(f, good)
        ok = (good > 0) & (cont > 0)
        flux.append(np.where(ok, f / np.where(ok, cont, 1.0), np.nan))
    composite = np.nanmedian(np.array(flux), axis=0)
    labels = {"teff": float(rows.teff.median()), "logg": float(rows.logg.median()),
              "fe_h": float(rows.feh.median())}
    stars = synth.solar_scaled_stars(labels["teff"], labels["logg"], labels["fe_h"])
    labels["vmic"] = float(stars.vmic.iloc[0])
    log.info("composite of %d even-obsid DR10 spectra, median labels %s", len(rows), labels)
    return composite, labels


#: Composites of even-obsid DR10 stars of other types than the G dwarfs of the empirical forest;
#: each empirical line's species and excitation potential are chosen so that its strength follows
#: them (:func:`_choose_responses`).
RESPONSE_COMPOSITES = {
    "K dwarf": {"teff": (4800.0, 5300.0), "logg": (4.2, 9.0), "feh": (-0.6, 0.3), "snrg_min": 40.0},
    "K giant": {"teff": (4450.0, 5000.0), "logg": (-9.0, 3.0), "feh": (-0.6, 0.3),
                "snrg_min": 40.0},
    "F dwarf": {"teff": (6300.0, 6800.0), "logg": (3.9, 9.0), "feh": (-0.5, 0.3), "snrg_min": 50.0},
}

#: Excitation potentials tried per forest species (eV): this many values across its range.
RESPONSE_CHI_STEPS = 5


def _component_ews(composite, labels, known, wave_air, n_iter=3):
    """Equivalent widths (A, >= 0) of empirical components at fixed positions in a composite:
    bounded linear least squares of the composite's residual optical depth (after the mock of the
    known lines, renormalised with the components) on LSF profiles, iterated for the continuum."""
    from scipy import sparse
    from scipy.optimize import lsq_linear

    from .. import spectra
    from . import synth

    wave = spectra.common_wavelength()
    stars = synth.solar_scaled_stars(labels["teff"], labels["logg"], labels["fe_h"],
                                     vmic=labels.get("vmic"))
    lab = synth._label_columns(stars)
    tau_known = synth._rest_tau(lab, synth._prepare_model(known))[
        0, synth._PAD:synth._PAD + synth.LAMOST_NPIX].astype(float)
    planck = synth.planck(wave, lab["teff"])[0]
    ok = np.isfinite(composite)
    air = vacuum_to_air(wave)
    allowed = ok.copy()
    for lo, hi in EMPIRICAL_MASK:
        allowed &= ~((air >= lo) & (air <= hi))
    for w in [h[1] for h in HYDROGEN_LINES]:
        allowed &= np.abs(air - w) > (12.0 if w > 6000 else 8.0)
    for w in known.wave_air[known.wide]:
        allowed &= np.abs(air - w) > 3.0
    pos = (np.log10(air_to_vacuum(wave_air)) - synth.LAMOST_LOG10_START) / synth.LAMOST_LOG10_STEP
    sig = synth._SIGMA_LSF_PIX
    rows, cols, vals = [], [], []
    for j, c in enumerate(pos):
        pix = np.arange(int(np.floor(c)) - 6, int(np.floor(c)) + 8)
        pix = pix[(pix >= 0) & (pix < wave.size)]
        rows.append(pix)
        cols.append(np.full(pix.size, j))
        vals.append(np.exp(-0.5 * ((pix - c) / sig) ** 2) / (np.sqrt(2 * np.pi) * sig))
    a_full = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows),
                                                       np.concatenate(cols))),
                               shape=(wave.size, pos.size))
    a_fit = a_full[np.flatnonzero(allowed)]
    ew_pix = np.zeros(pos.size)
    for _ in range(n_iter):
        tau_emp = a_full @ ew_pix
        mock = planck * np.exp(-(tau_known + tau_emp))
        cont = spectra.continuum(mock, ok.astype(float))
        y = -np.log(np.clip(np.where(ok, composite / (mock / cont), 1.0), 0.02, 2.0)) + tau_emp
        ew_pix = lsq_linear(a_fit, y[allowed], bounds=(0.0, np.inf), lsmr_tol="auto",
                            max_iter=200).x
    return ew_pix * synth._pixel_width(air_to_vacuum(wave_air))


def _choose_responses(emp_air, ews, labels):
    """Species and excitation potential of each empirical line from its strengths in several
    composites.

    ``ews``: dict composite name -> EW (A) per line, ``"G dwarf"`` the reference composite whose
    EW fixes log gf; ``labels``: dict name -> composite labels. For every line and every candidate
    (species of the pseudo-random forest x :data:`RESPONSE_CHI_STEPS` excitation potentials) the
    mock's physics predicts the other composites' EWs; the candidate with the smallest
    ``sum ((EW_model - EW_obs) / (3 mA + 0.15 EW_obs))^2 - 2 ln(species weight)`` wins. Returns
    species and chi arrays.
    """
    import pandas as pd

    from . import synth

    cands = []
    for species, weight, (c0, c1) in _FOREST_SPECIES:
        for chi in np.linspace(c0, c1, RESPONSE_CHI_STEPS):
            cands.append((species, round(float(chi), 2), weight))
    n, k = emp_air.size, len(cands)
    table = pd.DataFrame({"species": np.tile([c[0] for c in cands], n),
                          "wave_air": np.repeat(emp_air, k),
                          "chi": np.tile([c[1] for c in cands], n),
                          "target_ew": np.repeat(np.maximum(ews["G dwarf"], 1e-4), k)})
    table["loggf"] = synth.solve_loggf_for_solar_ew(table, labels["G dwarf"])
    species = [split_species(x) for x in table["species"]]
    species_list = tuple(sorted(set(species)))
    idx = np.array([species_list.index(x) for x in species])
    wave = table["wave_air"].to_numpy()
    base = table["loggf"].to_numpy() + np.log10(wave / 5000.0) + synth._k0()
    score = -2.0 * np.log(np.tile([c[2] for c in cands], n))
    for name, obs in ews.items():
        if name == "G dwarf":
            continue
        lab = synth._sun_labels()
        lab.update({key: np.full(1, float(v)) for key, v in labels[name].items()})
        lt, la, dl = synth._line_quantities(wave, table["chi"].to_numpy(), base, np.ones(wave.size),
                                            idx, species_list, lab)
        model = (dl * synth.reduced_width(lt, la))[0].astype(float)
        o = np.repeat(obs, k)
        score += ((model - o) / (0.003 + 0.15 * o)) ** 2
    best = np.argmin(score.reshape(n, k), axis=1)
    return (np.array([cands[b][0] for b in best]), np.array([cands[b][1] for b in best]))


def _empirical_components(known, lamost_dir):
    """CLEAN decomposition of a real G-dwarf composite into LSF-shaped absorption components.

    Returns (wave_air, ew (A), labels of the composite). See :func:`build_linelist`.
    """
    import pandas as pd

    from .. import spectra
    from . import synth

    sel = EMPIRICAL_SELECTION
    composite, labels = _composite(lamost_dir, {"teff": sel["teff"], "logg": (sel["logg_min"], 9.0),
                                                "feh": sel["feh"], "snrg_min": sel["snrg_min"]})
    wave = spectra.common_wavelength()
    stars = synth.solar_scaled_stars(labels["teff"], labels["logg"], labels["fe_h"])
    model = synth._prepare_model(known)
    lab = synth._label_columns(stars)
    tau_known = synth._rest_tau(lab, model)[0, synth._PAD:synth._PAD + synth.LAMOST_NPIX]
    planck = synth.planck(wave, lab["teff"])[0]
    ok = np.isfinite(composite)
    allowed = ok.copy()
    air = vacuum_to_air(wave)
    for lo, hi in EMPIRICAL_MASK:
        allowed &= ~((air >= lo) & (air <= hi))
    for w in [h[1] for h in HYDROGEN_LINES]:
        allowed &= np.abs(air - w) > (12.0 if w > 6000 else 8.0)
    for w in known.wave_air[known.wide]:
        allowed &= np.abs(air - w) > 3.0
    sig = synth._SIGMA_LSF_PIX
    x = np.arange(-8, 9)
    grid = np.arange(wave.size)
    pos, ew_pix = [], []
    tau_emp = np.zeros(wave.size)
    for _ in range(4):  # CLEAN against a mock re-normalised with the components found so far
        mock = planck * np.exp(-(tau_known + tau_emp))
        cont = spectra.continuum(mock, ok.astype(float))
        ratio = np.where(ok, composite / (mock / cont), 1.0)
        resid = np.where(allowed, -np.log(np.clip(ratio, 0.02, 1.0)), 0.0)
        for _ in range(20000):                              # CLEAN with loop gain 0.5
            p = int(np.argmax(resid))
            peak = resid[p]
            if peak < 0.004:
                break
            if 0 < p < wave.size - 1:
                y0, y1, y2 = resid[p - 1], resid[p], resid[p + 1]
                den = y0 - 2 * y1 + y2
                c = p + (0.5 * (y0 - y2) / den if den < 0 else 0.0)
            else:
                c = float(p)
            amp = 0.5 * peak
            cols = p + x
            okc = (cols >= 0) & (cols < wave.size)
            resid[cols[okc]] -= amp * np.exp(-0.5 * ((cols[okc] - c) / sig) ** 2)
            pos.append(c)
            ew_pix.append(amp * np.sqrt(2 * np.pi) * sig)
        if pos:
            tau_emp = np.zeros(wave.size)
            for c, e in zip(pos, ew_pix):
                tau_emp += e * np.exp(-0.5 * ((grid - c) / sig) ** 2) / (np.sqrt(2 * np.pi) * sig)
    pos = np.array(pos)
    ew_pix = np.array(ew_pix)
    # merge components closer than 0.35 px (EW-weighted position)
    order = np.argsort(pos)
    pos, ew_pix = pos[order], ew_pix[order]
    group = np.concatenate([[0], np.cumsum(np.diff(pos) > 0.35)])
    ew_g = np.bincount(group, ew_pix)
    pos_g = np.bincount(group, ew_pix * pos) / ew_g
    wave_vac = 10.0 ** (synth.LAMOST_LOG10_START + synth.LAMOST_LOG10_STEP * pos_g)
    ew = ew_g * synth._pixel_width(wave_vac)
    keep = ew > 0.003
    return vacuum_to_air(wave_vac[keep]), ew[keep], labels


def _empirical_responses(known, lamost_dir, emp_air, emp_ew, labels, rng):
    """Species and chi of the empirical lines: chosen from their strengths in the composites of
    :data:`RESPONSE_COMPOSITES` (:func:`_choose_responses`) where the line is measurable, drawn at
    random (as the pseudo-random forest) where it is not (EW < 5 mA in the G composite)."""
    weights = np.array([w for _, w, _ in _FOREST_SPECIES])
    pick = rng.choice(len(_FOREST_SPECIES), size=emp_air.size, p=weights / weights.sum())
    species = np.array([_FOREST_SPECIES[p][0] for p in pick], dtype=object)
    chi = np.array([round(rng.uniform(*_FOREST_SPECIES[p][2]), 2) for p in pick])
    comp_labels = {"G dwarf": labels}
    g_comp, _ = _composite(lamost_dir, {"teff": EMPIRICAL_SELECTION["teff"],
                                        "logg": (EMPIRICAL_SELECTION["logg_min"], 9.0),
                                        "feh": EMPIRICAL_SELECTION["feh"],
                                        "snrg_min": EMPIRICAL_SELECTION["snrg_min"]})
    ews = {"G dwarf": _component_ews(g_comp, labels, known, emp_air)}
    for name, sel in RESPONSE_COMPOSITES.items():
        comp, comp_labels[name] = _composite(lamost_dir, sel)
        ews[name] = _component_ews(comp, comp_labels[name], known, emp_air)
    fit = ews["G dwarf"] > 0.005
    sp, ch = _choose_responses(emp_air[fit], {k: v[fit] for k, v in ews.items()}, comp_labels)
    species[fit], chi[fit] = sp, ch
    log.info("empirical forest: species and chi of %d of %d lines chosen from %d composites",
             int(fit.sum()), emp_air.size, len(ews))
    return species, chi


def build_linelist(seed: int = FOREST_SEED, forest: str = "empirical", lamost_dir=None):
    """Assemble the line list (known + window + forest lines) as a pandas DataFrame.

    Columns: ``species`` (e.g. "Fe I"), ``element``, ``ion`` (1 neutral, 2 singly ionised),
    ``wave_air``, ``wave_vac`` (A), ``chi`` (eV), ``loggf``, ``ew_sun`` (A, NaN unless a damped line
    calibrator), ``wide`` (bool: strongly damped, rendered with a broad profile), ``source``
    (known|window|forest), ``note``.

    ``loggf`` of window lines without known data and of forest lines is solved so that the line
    has a target equivalent width in the mock Sun (:func:`lamostcannon.mock.synth.solar_ew`).

    ``forest="empirical"`` (default; needs the real LAMOST DR10 folder, ``lamost_dir`` or
    :func:`lamostcannon.paths.real_lamost_dir`) places the weak-line forest where real spectra have
    absorption: a median composite of the calibration set (:data:`EMPIRICAL_SELECTION`, even
    obsids only, continuum-normalised alike) is divided by the mock made from the known and window
    lines alone, and the remaining absorption is decomposed by CLEAN (loop gain 0.5, down to 0.4%
    depth) into LSF-shaped components outside :data:`EMPIRICAL_MASK`. Each component becomes a line
    ``source="empirical"`` of a species drawn like the pseudo-random forest, with its excitation
    potential drawn from the species' range and ``loggf`` solved so the mock composite star has the
    component's equivalent width; species and ``chi`` are those that best reproduce the
    component's strength in the composites of :data:`RESPONSE_COMPOSITES` (bounded least-squares
    equivalent widths at the same positions, :func:`_choose_responses`). Their temperature,
    gravity and abundance dependence is then the generator's physics, chosen among the candidates
    by the data. The decomposition is repeated four times, each time
    against the mock re-normalised with the components found so far (the continuum normalisation
    depends on the absorption). At R = 1800 a component stands for a blend, so these
    lines are not used at R = 28,000 (GALAH windows). The pseudo-random forest fills the masked
    regions. ``forest="random"`` uses the pseudo-random forest everywhere.
    """
    import pandas as pd

    from . import synth

    if forest not in ("empirical", "random"):
        raise ValueError(f"forest must be 'empirical' or 'random'; got {forest!r}")
    mode = forest
    rng = np.random.default_rng(seed)
    rows = []
    for species, wave, chi, loggf, ew_sun in KNOWN_LINES:
        element, ion = split_species(species)
        rows.append(dict(species=species, element=element, ion=ion, wave_air=wave, chi=chi,
                         loggf=loggf, ew_sun=np.nan if ew_sun is None else ew_sun,
                         wide=ew_sun is not None and ew_sun >= 0.25, source="known", note=""))
    known = pd.DataFrame(rows)

    # window lines: the known line if one lies in the window, else a line at the window midpoint
    window_rows = []
    for elem, windows in GALAH_WINDOWS.items():
        for lo, hi in windows:
            in_window = known[(known.wave_air >= lo) & (known.wave_air <= hi)
                              & (known.element.str.lower() == elem)]
            if len(in_window):
                known.loc[in_window.index, "note"] = f"GALAH {elem} window"
                continue
            mid = round(0.5 * (lo + hi), 2)
            species = _WINDOW_STAGE[elem]
            if any(e == elem and abs(w - mid) < 0.3 for e, w in _IONISED_WINDOW_LINES):
                species = species.replace(" I", " II")
            element, ion = split_species(species)
            chi = rng.uniform(*_TYPICAL_CHI[elem])
            window_rows.append(dict(species=species, element=element, ion=ion, wave_air=mid,
                                    chi=round(chi, 2), loggf=np.nan, ew_sun=np.nan, wide=False,
                                    source="window", note=f"GALAH {elem} window",
                                    target_ew=10 ** rng.uniform(np.log10(0.020), np.log10(0.090))))
    window = pd.DataFrame(window_rows)

    # forest: inhomogeneous Poisson process in wavelength with density _forest_density
    lo, hi = LIST_RANGE
    peak = float(_forest_density(lo))
    n_try = rng.poisson(peak * (hi - lo))
    wave = rng.uniform(lo, hi, n_try)
    wave = np.sort(wave[rng.uniform(0, peak, n_try) < _forest_density(wave)])
    weights = np.array([w for _, w, _ in _FOREST_SPECIES])
    pick = rng.choice(len(_FOREST_SPECIES), size=wave.size, p=weights / weights.sum())
    forest_rows = []
    # solar EW distribution dN/dlogW ~ W^-0.5 between 2 and 150 mA (inverse-CDF sampling)
    u = rng.uniform(size=wave.size)
    a, b, k = 0.002, 0.150, -0.5
    target = (a ** k + u * (b ** k - a ** k)) ** (1 / k)
    for w, p, t in zip(wave, pick, target):
        species, _, (c0, c1) = _FOREST_SPECIES[p]
        element, ion = split_species(species)
        forest_rows.append(dict(species=species, element=element, ion=ion, wave_air=round(w, 3),
                                chi=round(rng.uniform(c0, c1), 2), loggf=np.nan, ew_sun=np.nan,
                                wide=False, source="forest", note="pseudo-random forest",
                                target_ew=t))
    forest = pd.DataFrame(forest_rows)

    if mode == "empirical":
        from .. import paths

        base_table = pd.concat([known, window], ignore_index=True)
        solve_known = base_table.loggf.isna()
        base_table.loc[solve_known, "loggf"] = synth.solve_loggf_for_solar_ew(
            base_table[solve_known])
        base_table["wave_vac"] = air_to_vacuum(base_table.wave_air)
        folder = paths.real_lamost_dir() if lamost_dir is None else lamost_dir
        emp_air, emp_ew, labels = _empirical_components(base_table, folder)
        erng = np.random.default_rng(seed + 1)
        emp_species, emp_chi = _empirical_responses(base_table, folder, emp_air, emp_ew, labels,
                                                     erng)
        emp_rows = []
        for w, sp, chi, ew in zip(emp_air, emp_species, emp_chi, emp_ew):
            element, ion = split_species(sp)
            emp_rows.append(dict(species=sp, element=element, ion=ion, wave_air=round(w, 3),
                                 chi=chi, loggf=np.nan, ew_sun=np.nan,
                                 wide=False, source="empirical",
                                 note="LAMOST composite blend", target_ew=ew))
        empirical = pd.DataFrame(emp_rows)
        empirical["loggf"] = synth.solve_loggf_for_solar_ew(empirical, labels)
        # the pseudo-random forest only where the empirical one is masked
        air = forest.wave_air.to_numpy()
        masked = np.zeros(air.size, bool)
        for lo, hi in EMPIRICAL_MASK:
            masked |= (air >= lo) & (air <= hi)
        forest = pd.concat([forest[masked], empirical], ignore_index=True)
        log.info("empirical forest: %d lines (+%d pseudo-random in masked regions)",
                 len(empirical), int(masked.sum()))

    table = pd.concat([known, window, forest], ignore_index=True)
    solve = table.loggf.isna()
    table.loc[solve, "loggf"] = synth.solve_loggf_for_solar_ew(table[solve])
    table["loggf"] = table.loggf.round(3)
    table["wave_vac"] = air_to_vacuum(table.wave_air).round(3)
    table = table.drop(columns="target_ew").sort_values("wave_air", kind="stable")
    cols = ["species", "element", "ion", "wave_air", "wave_vac", "chi", "loggf", "ew_sun", "wide",
            "source", "note"]
    return table[cols].reset_index(drop=True)


def linelist_path():
    """The package file holding the line list."""
    from .. import paths

    return paths.PACKAGE_DATA / "linelist.csv"


def write_linelist(path=None, seed: int = FOREST_SEED, forest: str = "empirical"):
    """Build the line list and write it as CSV with a provenance header."""
    path = linelist_path() if path is None else path
    table = build_linelist(seed, forest=forest)
    header = (
        "# lamostcannon mock line list (lamostcannon.mock.linelist.build_linelist, "
        f"seed {seed}, forest {forest}); wavelengths in Angstrom (air and vacuum), chi in eV; "
        "see the module docstring. The empirical forest is derived from public LAMOST DR10 "
        "spectra (Guoshoujing Telescope; https://www.lamost.org/policies/).\n"
    )
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(header)
        table.to_csv(fh, index=False, float_format="%.6g")
    tmp.replace(path)
    log.info("wrote %d lines to %s", len(table), path)
    return path


# ------------------------------------------------------------------------------------------------
# The night-sky emission lines as LAMOST records them
# ------------------------------------------------------------------------------------------------

#: Calibration set of the sky-line spectrum: real DR10 files with EVEN obsid and snrg above this
#: (the odd ones are held out for the realism tests).
SKY_SELECTION = {"snrg_min": 20.0, "good_fraction": 0.9}

#: Sky lines are kept redward of this (A, vacuum) and where their median counts per pixel exceed
#: ``SKY_MIN_COUNTS`` (below, the measurement is dominated by stellar absorption lines).
SKY_MIN_WAVE = 5500.0
SKY_MIN_COUNTS = 150.0

#: Observed-frame (vacuum A) windows left out of the sky-line spectrum: the O2 B and A bands,
#: where the stars' own flux is absorbed and the variance no longer measures the sky.
SKY_EXCLUDE = [(6862.0, 6960.0), (7592.0, 7700.0)]


def build_sky_lines(lamost_dir=None):
    """The sky emission-line spectrum (counts per pixel on the LAMOST grid) from real LAMOST files.

    A LAMOST spectrum's inverse variance contains the photon noise of the sky it was observed
    through, so every real file is also a record of the night-sky lines (OH bands, [O I] 5577,
    6300, 6364, Na D ...) at their true wavelengths and typical strengths. For each calibration file
    (:data:`SKY_SELECTION`, even obsids) on the LAMOST observed-frame grid: the variance
    ``1/ivar``, its local baseline (30th percentile over 61 pixels: star + sky continuum + read
    noise), the local counts per flux unit ``g = flux / baseline`` (photon-limited pixels:
    variance in counts equals counts), and the excess variance in counts
    ``(var - baseline) g^2``, which is the sky-line counts of that exposure. The median over the
    files, kept redward of :data:`SKY_MIN_WAVE` where it exceeds :data:`SKY_MIN_COUNTS` (and
    outside the telluric bands of :data:`SKY_EXCLUDE`), is the
    mock's sky-line spectrum (:func:`lamostcannon.mock.synth` adds it to a smooth sky continuum).

    Returns
    -------
    pandas.DataFrame with ``pixel`` (index on the LAMOST grid), ``wave_vac`` (A) and ``counts``
    (sky-line counts per pixel in a typical exposure), only for pixels with sky lines.
    """
    import pandas as pd
    from scipy.ndimage import median_filter, percentile_filter

    from .. import paths, spectra
    from . import synth

    folder = (paths.real_lamost_dir() if lamost_dir is None else lamost_dir) / "dr10"
    cat = pd.read_csv(folder / "catalog.csv")
    use = (cat.obsid % 2 == 0) & (cat.snrg > SKY_SELECTION["snrg_min"])
    wave = synth.lamost_wavelength()
    rows = []
    for name in cat.filename[use]:
        spec = spectra.read_lamost(folder / name)
        if spec.flux.size != wave.size or not np.allclose(spec.wavelength, wave, rtol=1e-6):
            continue
        ok = (spec.ivar > 0) & (spec.andmask == 0) & (spec.flux > 0) & np.isfinite(spec.flux)
        if ok.mean() < SKY_SELECTION["good_fraction"]:
            continue
        var = np.where(ok, 1.0 / np.where(ok, spec.ivar, 1.0), np.nan)
        filled = np.where(ok, var, np.nanmedian(var))
        base = percentile_filter(filled, 30, size=61)
        gain = median_filter(np.where(ok, spec.flux, 0.0), 61) / np.maximum(base, 1e-30)
        rows.append((var - base) * gain ** 2)
    if not rows:
        raise FileNotFoundError(f"no usable even-obsid DR10 spectra in {folder}")
    counts = np.nanmedian(np.array(rows), axis=0)
    keep = np.isfinite(counts) & (counts > SKY_MIN_COUNTS) & (wave > SKY_MIN_WAVE)
    for lo, hi in SKY_EXCLUDE:
        keep &= ~((wave >= lo) & (wave <= hi))
    log.info("sky lines: median of %d DR10 spectra, %d pixels with sky lines", len(rows),
             int(keep.sum()))
    idx = np.flatnonzero(keep)
    return pd.DataFrame({"pixel": idx, "wave_vac": wave[idx].round(3),
                         "counts": counts[idx].round(1)})


def sky_lines_path():
    """The package file holding the sky-line spectrum."""
    from .. import paths

    return paths.PACKAGE_DATA / "sky_lines.csv"


def write_sky_lines(path=None, lamost_dir=None):
    """Measure the sky-line spectrum (:func:`build_sky_lines`) and write it as CSV."""
    path = sky_lines_path() if path is None else path
    table = build_sky_lines(lamost_dir)
    header = ("# lamostcannon mock sky-line spectrum (lamostcannon.mock.linelist.build_sky_lines): "
              "counts per pixel of the LAMOST grid in a typical exposure, measured from the "
              "variance of public LAMOST DR10 spectra with even obsid (Guoshoujing Telescope; "
              "https://www.lamost.org/policies/).\n")
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(header)
        table.to_csv(fh, index=False)
    tmp.replace(path)
    log.info("wrote %d sky-line pixels to %s", len(table), path)
    return path


@functools.lru_cache(maxsize=1)
def load_sky_lines():
    """The packaged sky-line spectrum (DataFrame: ``pixel``, ``wave_vac``, ``counts``)."""
    import pandas as pd

    return pd.read_csv(sky_lines_path(), comment="#")


@functools.lru_cache(maxsize=1)
def load_linelist():
    """The packaged line list (pandas DataFrame; see :func:`build_linelist` for the columns)."""
    import pandas as pd

    table = pd.read_csv(linelist_path(), comment="#")
    table["wide"] = table["wide"].astype(bool)
    table["note"] = table["note"].fillna("")
    return table


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    write_linelist()
    write_sky_lines()
