"""lamostcannon: companion code for Wheeler et al. (2020, ApJ 898, 58).

*The Cannon* trained on LAMOST low-resolution spectra with GALAH DR2.1 labels, and the
pipeline around it: archives or an offline mock universe, cleaning, training, cross-validation,
catalogue inference, kinematics and the science figures.

The package logs through :mod:`logging` (logger ``"lamostcannon"``) and never prints.
Nothing is loaded at import time.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__"]
