"""Every path the project uses, in one place.

All paths are relative to the repository (or to a folder named by an environment variable), so
that notebooks never spell out ``../data`` or an absolute path.

=============================  ==============================================  ======================
function                       default                                         override
=============================  ==============================================  ======================
:func:`data_dir`               ``<repo>/data``                                 ``LAMOSTCANNON_DATA``
:func:`raw_dir`                ``<data>/raw/<source>``  (source: mock|archive)
:func:`interim_dir`            ``<data>/interim``
:func:`processed_dir`          ``<data>/processed``
:func:`figures_dir`            ``<repo>/figures``                              ``LAMOSTCANNON_FIGURES``
:func:`real_lamost_dir`        ``<repo>/../shared/data/lamost``                ``LAMOSTCANNON_LAMOST_DIR``
=============================  ==============================================  ======================

The directories are created on first use by :func:`ensure`, never at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Root of the repository (the folder that holds ``pyproject.toml``).
ROOT = Path(__file__).resolve().parent.parent

#: The package's own small data files (line lists, style file).
PACKAGE_DATA = Path(__file__).resolve().parent / "data"

#: The matplotlib style file used by every figure.
STYLE_FILE = Path(__file__).resolve().parent / "lamostcannon.mplstyle"


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


def ensure(path: Path) -> Path:
    """Create ``path`` (a directory) if needed and return it."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (a temporary name of this process in
    the same folder, then renamed into place), so a reader never sees half a file. NumPy scalars and arrays are
    written as numbers and lists."""
    import json

    def default(o):
        if hasattr(o, "tolist"):  # np.generic and np.ndarray
            return o.tolist()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    path = Path(path)
    ensure(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # racing writers: the last one wins
    tmp.write_text(json.dumps(obj, indent=1, default=default) + "\n")
    tmp.replace(path)
    return path


def read_json(path, what: str):
    """The JSON object in ``path``; a ValueError naming ``what`` the file should have been when it
    is not JSON (a truncated or foreign file)."""
    import json

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not {what} file: {exc}") from exc


def data_dir() -> Path:
    """Root of the data tiers (``raw``, ``interim``, ``processed``)."""
    return _env_path("LAMOSTCANNON_DATA", ROOT / "data")


def raw_dir(source: str | None = None) -> Path:
    """Immutable downloaded or generated inputs, ``<data>/raw/<source>``.

    Parameters
    ----------
    source : {"mock", "archive"}, optional
        Defaults to the current setting (:func:`lamostcannon.config.settings`).
    """
    if source is None:
        from .config import settings

        source = settings().source
    return data_dir() / "raw" / source


def interim_dir() -> Path:
    """Cleaned, intermediate products (reference set, spectra stores)."""
    return data_dir() / "interim"


def processed_dir() -> Path:
    """Final products: models, cross-validation tables, the catalogue."""
    return data_dir() / "processed"


def figures_dir() -> Path:
    """Where every figure is written."""
    return _env_path("LAMOSTCANNON_FIGURES", ROOT / "figures")


def real_lamost_dir() -> Path:
    """The folder of real LAMOST spectra (read-only), ``../shared/data/lamost`` by default."""
    return _env_path("LAMOSTCANNON_LAMOST_DIR", ROOT.parent / "shared" / "data" / "lamost")
