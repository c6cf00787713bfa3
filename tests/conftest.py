"""Shared fixtures.

``real_lamost`` gives the folder of real LAMOST spectra (``../shared/data/lamost`` or
``LAMOSTCANNON_LAMOST_DIR``). When the folder is missing the test is skipped with a reason on a
user's machine, but fails when ``LAMOSTCANNON_REQUIRE_REAL=1`` (as ``.ci/run`` sets).
"""

from __future__ import annotations

import pytest

from lamostcannon import paths
from lamostcannon.config import settings


def require_real_dir(subfolder: str = ""):
    """Return the real-spectra folder (or a subfolder), skipping or failing when it is absent."""
    folder = paths.real_lamost_dir() / subfolder
    if not folder.is_dir():
        reason = (f"real LAMOST spectra not found at {folder}; set LAMOSTCANNON_LAMOST_DIR to the "
                  "folder that holds dr10/, dr8_repeats/ and formats/")
        if settings().require_real:
            pytest.fail(reason + " (LAMOSTCANNON_REQUIRE_REAL=1 makes this a failure)")
        pytest.skip(reason)
    return folder


@pytest.fixture(scope="session")
def real_lamost():
    """Folder of the real LAMOST files; see the module docstring."""
    return require_real_dir()


@pytest.fixture
def rng():
    """A seeded generator for tests that draw."""
    import numpy as np

    return np.random.default_rng(20200701)
