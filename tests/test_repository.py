"""Repository hygiene: notebooks without outputs, dependency lists in sync, no absolute paths."""

import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(nb_path):
    nb = json.loads(nb_path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"])
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))]
    assert not dirty, f"{nb_path.name}: cells {dirty} carry outputs; clear them before committing"


def test_notebooks_are_numbered_and_in_order():
    names = [p.name for p in NOTEBOOKS]
    numbers = [int(n[:2]) for n in names]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), names
    assert all(re.match(r"\d\d_[a-z0-9_]+\.ipynb$", n) for n in names), names


def _names(requirements):
    return {re.split(r"[<>=!\[ ;]", r.strip(), maxsplit=1)[0].lower().replace("_", "-")
            for r in requirements}


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = (ROOT / "environment.yml").read_text()
    listed = {m.group(1).lower().replace("_", "-")
              for m in re.finditer(r"^\s*-\s+([A-Za-z0-9_.\-]+)", env, flags=re.M)}
    conda_name = {"isal": "python-isal"}  # conda-forge names that differ from PyPI's
    missing = {conda_name.get(n, n) for n in _names(deps)} - listed
    assert not missing, f"environment.yml lacks {sorted(missing)}"


def test_no_absolute_paths_or_relative_data_strings_in_notebooks():
    for nb_path in NOTEBOOKS:
        nb = json.loads(nb_path.read_text())
        for cell in nb["cells"]:
            src = "".join(cell["source"])
            assert "../data" not in src and "/work/" not in src and "/home/" not in src, nb_path.name


def test_write_json_is_atomic_and_writes_numpy_values(tmp_path):
    """paths.write_json leaves no temporary file and reads back NumPy scalars and arrays."""
    import json

    import numpy as np

    from lamostcannon import paths

    out = paths.write_json(tmp_path / "sub" / "x.json", {"a": np.float32(1.5), "b": np.arange(3),
                                                         "c": np.int64(7)})
    assert json.loads(out.read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": 7}
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.json"]


def test_broken_calibration_files_give_a_clear_error(tmp_path):
    """A truncated or foreign calibration file names itself in a ValueError."""
    import pytest

    from lamostcannon import ood, uncertainty

    (tmp_path / "half.json").write_text('{"labels": {"teff": ')
    (tmp_path / "other.json").write_text('{"something": "else"}')
    for reader, what in ((ood.read_calibration, "OOD calibration"),
                         (uncertainty.read_error_model, "uncertainty calibration")):
        for name in ("half.json", "other.json"):
            with pytest.raises(ValueError, match=what):
                reader(tmp_path / name)
