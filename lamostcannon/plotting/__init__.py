"""Figure helpers. Notebooks call these; they never style figures themselves.

:func:`setup` applies the one style file and returns a line of versions to print; :func:`savefig`
writes byte-stable files (no creation dates or software tags) to :func:`lamostcannon.paths.figures_dir`.
Figure-specific helpers live in the submodules (``plotting.spectra``, ``plotting.training``,
``plotting.validation``, ``plotting.science``, ...).
"""

from __future__ import annotations

import logging
from pathlib import Path

from .. import paths

log = logging.getLogger(__name__)

#: Metadata that keeps saved figures byte-stable between runs.
_STABLE_METADATA = {
    ".png": {"Software": None},
    ".pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None},
    ".svg": {"Date": None, "Creator": None},
}


#: Axis labels of catalogue columns (mathtext, no LaTeX).
LABEL_TEXT = {
    "teff": r"$T_{\rm eff}$ [K]", "logg": r"$\log g$", "vmic": r"$v_{\rm mic}$ [km/s]",
    "fe_h": "[Fe/H]", "alpha_fe": r"[$\alpha$/Fe]", "s_fe": "[s/Fe]",
    "R": "R [kpc]", "z": "z [kpc]", "X": "X [kpc]", "Y": "Y [kpc]",
    "vphi": r"$v_\phi$ [km/s]", "vT": r"$v_T$ [km/s]", "JR": r"$J_R$ [kpc km/s]",
    "Jz": r"$J_z$ [kpc km/s]", "Jphi": r"$J_\phi$ [kpc km/s]", "av": r"$A_V$",
}


def label_text(name: str) -> str:
    """Axis label of a column (``"mg_fe"`` -> ``"[Mg/Fe]"``, ``"teff"`` -> ``T_eff [K]``)."""
    if name in LABEL_TEXT:
        return LABEL_TEXT[name]
    if name.endswith("_fe"):
        return f"[{name[:-3].capitalize()}/Fe]"
    return name


def use_style():
    """Apply the package's matplotlib style file."""
    import matplotlib.pyplot as plt

    plt.style.use(str(paths.STYLE_FILE))


def setup(seed: int | None = None) -> str:
    """One call at the top of each notebook: apply the style and describe the environment.

    Returns a one-line summary (versions, data source, size, seed) for the notebook to print.
    """
    import sys

    import astropy
    import matplotlib
    import numpy

    from .. import __version__
    from ..config import settings

    use_style()
    s = settings()
    return (
        f"lamostcannon {__version__} | python {sys.version.split()[0]} | numpy {numpy.__version__} | "
        f"astropy {astropy.__version__} | matplotlib {matplotlib.__version__} | "
        f"source={s.source} size={s.size} seed={s.seed if seed is None else seed} workers={s.n_workers}"
    )


def savefig(fig, name: str, formats=(".png",), directory: Path | None = None) -> list[Path]:
    """Save ``fig`` as ``<figures>/<name><ext>`` for each format, byte-stable between runs.

    ``name`` says what the figure shows (``"kiel_reference_set"``), not a figure number.
    Files are written to a temporary name and renamed into place.
    """
    directory = paths.ensure(directory or paths.figures_dir())
    written = []
    for ext in formats:
        ext = ext if ext.startswith(".") else "." + ext
        target = directory / f"{name}{ext}"
        tmp = target.with_name(f".{target.stem}.tmp{ext}")
        fig.savefig(tmp, metadata=_STABLE_METADATA.get(ext))
        tmp.replace(target)
        written.append(target)
        log.info("wrote %s", target)
    return written
