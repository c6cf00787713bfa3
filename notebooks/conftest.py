"""nbval settings for the notebooks.

Notebook 09 needs the real LAMOST spectra. When they are missing it is skipped with the reason on
a user's machine, and fails (runs, and stops at its first data cell with the message) when
``LAMOSTCANNON_REQUIRE_REAL=1``, as ``.ci/run`` sets.
"""

import pytest

from lamostcannon.config import settings


def pytest_collection_modifyitems(config, items):
    if settings().require_real:
        return
    from lamostcannon.real import RealDataMissing, real_sources

    try:
        real_sources()
    except RealDataMissing as exc:
        skip = pytest.mark.skip(reason=f"notebook 09 needs the real spectra: {exc}")
        for item in items:
            if item.path.name.startswith("09_"):
                item.add_marker(skip)
