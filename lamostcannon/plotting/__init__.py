"""Figure helpers. Notebooks call these; they never style figures themselves.

:func:`setup` applies the one style file and returns a line of versions to print; :func:`savefig`
writes byte-stable files (no creation dates or software tags) to :func:`lamostcannon.paths.figures_dir`
and, in a notebook, shows the figure once with the file it went to and the paper figure it
corresponds to (:mod:`lamostcannon.plotting.figure_map`). Figure-specific helpers live in the
submodules (``plotting.universe``, ``plotting.training``, ``plotting.validation``,
``plotting.catalog``, ``plotting.science``, ``plotting.real``, ...).

Conventions shared by every helper: axis labels from :func:`label_text` (units in square
brackets), colour-bar labels from :func:`colorbar_text` (``mean [Fe/H] [dex]``), and the names of
the two Cartesian frames from :data:`FRAME_AXIS_TEXT`, so that every map says which frame it is in.
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

#: Units of the labels and coordinates (``label_unit``); abundances are in dex, log g in dex (cgs).
UNITS = {
    "teff": "K", "logg": "dex", "vmic": "km/s", "fe_h": "dex", "R": "kpc", "z": "kpc",
    "X": "kpc", "Y": "kpc", "vphi": "km/s", "vT": "km/s", "JR": "kpc km/s", "Jz": "kpc km/s",
    "Jphi": "kpc km/s", "av": "mag",
}

#: The two Cartesian conventions of the maps, named on every axis that uses them. Paper Fig. 1
#: is heliocentric (the Sun at the origin, the Galactic centre at x = +8 kpc); Figs 10-14 are
#: Galactocentric and right-handed (the centre at the origin, the Sun at X = +8 kpc, z = +0.025).
FRAME_AXIS_TEXT = {
    "helio_x": "x [kpc] (heliocentric; Galactic centre at x = +8)",
    "helio_y": "y [kpc] (heliocentric; towards l = 90 deg)",
    "helio_z": "z [kpc] (heliocentric; towards the NGP)",
    "X": "X [kpc] (Galactocentric; Sun at X = +8)",
    "Y": "Y [kpc] (Galactocentric)",
    "R": "R [kpc] (Galactocentric; Sun at R = 8)",
    "z": "z [kpc] (Galactocentric; Sun at z = +0.025)",
    "vphi": r"$v_\phi$ [km/s] (> 0: with the rotation)",
}


def label_text(name: str) -> str:
    """Axis label of a column (``"mg_fe"`` -> ``"[Mg/Fe]"``, ``"teff"`` -> ``T_eff [K]``)."""
    if name in LABEL_TEXT:
        return LABEL_TEXT[name]
    if name.endswith("_fe"):
        return f"[{name[:-3].capitalize()}/Fe]"
    return name


def label_unit(name: str) -> str:
    """Unit of a label or coordinate (``"mg_fe"`` -> ``"dex"``, ``"teff"`` -> ``"K"``); ``""`` if
    unknown."""
    if name in UNITS:
        return UNITS[name]
    return "dex" if name.endswith("_fe") else ""


def colorbar_text(name: str, stat: str = "mean") -> str:
    """Colour-bar label with the statistic and the unit, e.g. ``"mean [Fe/H] [dex]"``,
    ``"mean $T_{\\rm eff}$ [K]"``, ``"$J_R$ [kpc km/s]"`` (``stat=""``)."""
    base = label_text(name).split(" [")[0]
    unit = label_unit(name)
    text = f"{stat} {base}".strip()
    return f"{text} [{unit}]" if unit else text


def axis_text(name: str) -> str:
    """Axis label of a map coordinate with its frame (:data:`FRAME_AXIS_TEXT`), or
    :func:`label_text` for anything else."""
    return FRAME_AXIS_TEXT.get(name, label_text(name))


def use_style():
    """Apply the package's matplotlib style file."""
    import matplotlib.pyplot as plt

    plt.style.use(str(paths.STYLE_FILE))


def setup(seed: int | None = None, data: str | None = None) -> str:
    """One call at the top of each notebook: apply the style and describe the environment.

    Parameters
    ----------
    seed : int, optional
        The seed to report instead of ``LAMOSTCANNON_SEED``.
    data : str, optional
        What the notebook reads, when it is not the configured source (notebook 09 reads real
        LAMOST spectra whatever ``LAMOSTCANNON_SOURCE`` says): replaces ``source=... size=...``.

    Returns a one-line summary (versions, data, seed) for the notebook to print.
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
        + (f"data={data}" if data else f"source={s.source} size={s.size}")
        + f" seed={s.seed if seed is None else seed} workers={s.n_workers}"
    )


class SavedFigure(list):
    """The files :func:`savefig` wrote (a list of :class:`pathlib.Path`), shown by their
    repository-relative names so that a notebook never echoes the machine's absolute paths."""

    def __init__(self, files, name: str, shown: bool = False):
        super().__init__(files)
        self.name = name
        self.shown = shown

    @property
    def relative(self) -> list[str]:
        """The written files as names relative to the repository (``figures/<name>.png``)."""
        from ..nbtools import shown_path

        return [shown_path(p) for p in self]

    def __repr__(self) -> str:
        return ", ".join(self.relative)

    def _repr_pretty_(self, p, cycle):  # IPython's plain-text echo
        p.text(repr(self))

    def _ipython_display_(self):
        """Nothing when :func:`savefig` has shown the figure with its caption; else the names."""
        if not self.shown:
            from IPython.display import display

            display({"text/plain": repr(self)}, raw=True)


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (a notebook), False in scripts, tests and terminal IPython."""
    import sys

    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def figure_caption(name: str, files) -> tuple[str, str]:
    """(markdown, plain text) caption of a saved figure: its files and the paper figure it is
    (from :mod:`lamostcannon.plotting.figure_map`)."""
    from ..nbtools import shown_path
    from .figure_map import paper_figure_text

    names = ", ".join(f"`{shown_path(p)}`" for p in files)
    paper = paper_figure_text(name)
    md = f"*Figure* {names}" + (f" · {paper}" if paper else "")
    return md, md.replace("`", "").replace("*", "")


def savefig(fig, name: str, formats=(".png",), directory: Path | None = None, *,
            show: bool | None = None) -> SavedFigure:
    """Save ``fig`` as ``<figures>/<name><ext>`` for each format, byte-stable between runs.

    ``name`` says what the figure shows (``"kiel_reference_set"``), not a figure number; the
    paper figure it corresponds to is looked up in :mod:`lamostcannon.plotting.figure_map`.
    Files are written to a temporary name and renamed into place.

    Parameters
    ----------
    show : bool, optional
        Show the figure now, followed by a one-line caption (the file names and the paper figure),
        and close it, so that it appears exactly once. The displayed image carries the metadata
        ``{"lamostcannon": {"figure": name, "paper_figure": ..., "files": [...]}}``, which the
        static site (:mod:`lamostcannon.site`) uses to anchor and caption it. Default: only in a
        Jupyter kernel.

    Returns
    -------
    SavedFigure
        The written paths (a list of :class:`pathlib.Path`), echoed as relative names.
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
    saved = SavedFigure(written, name)
    if show is None:
        show = _in_kernel()
    if show and not getattr(fig, "_lamostcannon_shown", False):
        import matplotlib.pyplot as plt
        from IPython.display import display

        from .figure_map import paper_figure

        md, text = figure_caption(name, written)
        display(fig, metadata={"lamostcannon": {"figure": name, "paper_figure": paper_figure(name),
                                                "files": saved.relative}})
        display({"text/markdown": md, "text/plain": text}, raw=True,
                metadata={"lamostcannon": {"caption_for": name}})
        fig._lamostcannon_shown = True
        saved.shown = True
        plt.close(fig)
    return saved
