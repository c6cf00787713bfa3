"""The figure helpers as a reader needs them (issue 16): legends, units, frames, colour maps,
no clipping, captions; and ``plotting.savefig`` (byte-stable, relative names). Synthetic inputs."""

from __future__ import annotations

import types

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from lamostcannon import maps, plotting, validation
from lamostcannon.plotting import catalog as pcat
from lamostcannon.plotting import science, training
from lamostcannon.plotting import validation as pval


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _legend_texts(fig):
    texts = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    for ax in fig.axes:
        if ax.get_legend() is not None:
            texts += [t.get_text() for t in ax.get_legend().get_texts()]
    return texts


def _colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def _colorbar_objects(fig):
    return [c.colorbar for ax in fig.axes for c in ax.collections
            if getattr(c, "colorbar", None) is not None]


# ----------------------------------------------------------------------------- shared text
def test_units_frames_and_colorbar_text():
    assert plotting.label_unit("mg_fe") == "dex" and plotting.label_unit("teff") == "K"
    assert plotting.label_unit("JR") == "kpc km/s" and plotting.label_unit("unknown") == ""
    assert plotting.colorbar_text("fe_h") == "mean [Fe/H] [dex]"
    assert plotting.colorbar_text("teff") == r"mean $T_{\rm eff}$ [K]"
    assert plotting.colorbar_text("vphi", stat="") == r"$v_\phi$ [km/s]"
    assert "Sun at X = +8" in plotting.axis_text("X")
    assert "Galactic centre at x = +8" in plotting.FRAME_AXIS_TEXT["helio_x"]
    assert plotting.axis_text("fe_h") == "[Fe/H]"


def test_savefig_is_byte_stable_and_shows_relative_names(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    saved = plotting.savefig(fig, "a_line", formats=(".png", "pdf"), directory=tmp_path,
                             show=False)
    first = [p.read_bytes() for p in saved]
    again = plotting.savefig(fig, "a_line", formats=(".png", "pdf"), directory=tmp_path,
                             show=False)
    assert [p.read_bytes() for p in again] == first
    assert [p.name for p in saved] == ["a_line.png", "a_line.pdf"]
    assert all(p.is_absolute() for p in saved)            # still a list of Paths for code
    assert str(tmp_path) not in repr(saved)              # but never echoed with machine paths
    assert "PosixPath" not in repr(saved)
    assert not list(tmp_path.glob(".*tmp*"))             # no temporary file left


def test_savefig_repr_inside_the_figures_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMOSTCANNON_FIGURES", str(tmp_path / "figs"))
    fig, _ = plt.subplots()
    saved = plotting.savefig(fig, "kiel_diagram_reference_set", show=False)
    assert repr(saved) == "figures/kiel_diagram_reference_set.png"
    md, text = plotting.figure_caption("kiel_diagram_reference_set", saved)
    assert "paper Fig. 3" in md and "`figures/kiel_diagram_reference_set.png`" in md
    assert "`" not in text


# ----------------------------------------------------------------------------- Fig 8
def test_fit_examples_does_not_clip_a_cool_giant(rng):
    w = np.linspace(4000.0, 5500.0, 600)
    flux = np.ones((3, w.size)) + rng.normal(0, 0.01, (3, w.size))
    flux[2, 300:360] = 0.05                      # a cool giant's deep molecular band
    model = flux + 0.01
    ivar = np.full_like(flux, 1e4)
    ivar[0, :10] = 0.0
    fig = pcat.fit_examples(w, flux, ivar, model, ["a", "b", "cool giant"],
                            model_s2=np.full(w.size, 1e-4))
    axes = [ax for ax in fig.axes if ax.get_visible()]
    lo, hi = axes[2].get_ylim()
    assert lo < 0.05 - 0.01 and hi > 1.0        # the band is inside the panel
    assert axes[0].get_ylim()[0] > 0.5           # each panel its own range
    texts = _legend_texts(fig)
    assert any("LAMOST data" in t and r"1\sigma" in t for t in texts)
    assert any("Cannon model" in t and "s_" in t for t in texts)
    fixed = pcat.fit_examples(w, flux, ivar, model, ["a", "b", "c"], ylim=(0.2, 1.3))
    assert fixed.axes[2].get_ylim() == (0.2, 1.3)
    with pytest.raises(ValueError, match="titles"):
        pcat.fit_examples(w, flux, ivar, model, ["a"])
    with pytest.raises(ValueError, match=r"\(n, P\)"):
        pcat.fit_examples(w, flux[:, :-1], ivar, model, ["a", "b", "c"])


# ----------------------------------------------------------------------------- Figs 5, 6, 7
def _cv(rng, n=400):
    true = rng.normal(size=(n, 2))
    return pd.DataFrame({
        "true_teff": 5000 + 500 * true[:, 0],
        "inferred_teff": 5000 + 450 * true[:, 0] + rng.normal(0, 50, n),
        "true_mg_fe": 0.1 * true[:, 1],
        "inferred_mg_fe": 0.05 * np.tanh(true[:, 1]) + rng.normal(0, 0.01, n)})


def test_cv_one_to_one_legend_statistics_clear_of_lines(rng):
    cv = _cv(rng)
    m = validation.cv_metrics(cv)
    b = validation.extrapolation_boundaries(cv)
    fig = pval.cv_one_to_one(cv, metrics=m, boundaries=b, title="dwarf model")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    for ax, name in zip(panels, ["teff", "mg_fe"]):
        assert not ax.texts                      # nothing written over the data or the lines
        title = ax.get_title(loc="left")
        assert f"N = {len(cv):,}" in title and "scatter" in title and "bias" in title
    assert " K" in panels[0].get_title(loc="left") and "dex" in panels[1].get_title(loc="left")
    texts = _legend_texts(fig)
    assert "one-to-one" in texts
    assert any(t.startswith("KDE extrapolation boundary (90%") for t in texts)
    # the saturating mg_fe model has a finite boundary inside its panel
    assert any(line.get_linestyle() == "--" for line in panels[1].get_lines())
    assert fig._suptitle.get_text() == "dwarf model"


def test_kde_boundary_labels_the_levels(rng):
    cv = _cv(rng)
    fig = pval.kde_boundary(cv["true_mg_fe"], cv["inferred_mg_fe"], name="mg_fe", level=0.9)
    right = fig.axes[1]
    labels = {t.get_text().strip() for t in right.texts}
    assert {"F = 0.9", "F = 0.1"} <= labels
    assert any("0.1 and 0.9" in t for t in _legend_texts(fig))
    assert fig.axes[0].get_legend() is not None


def test_relative_precision_reference_band():
    df = pd.DataFrame({"relative_precision": [0.3, 0.6]}, index=["o_fe", "mg_fe"])
    fig = pval.relative_precision({"dwarfs": df, "giants": df * 0.9},
                                  reference=(0.3, 0.5, "paper: generally 30-50%"))
    assert "paper: generally 30-50%" in _legend_texts(fig)


# ----------------------------------------------------------------------------- Fig 9
def test_chemical_distance_labels_modes_and_medians(rng):
    db, dfield = rng.gamma(2, 0.4, 100), rng.gamma(4, 0.6, 500)
    growth = pd.DataFrame({"n_elements": [1, 2], "added": ["o_fe", "mg_fe"],
                           "median_binary": [0.5, 0.8], "median_field": [1.2, 2.0],
                           "ratio": [2.4, 2.5]})
    fig = science.chemical_distance_figure(db, dfield, growth=growth, peaks=(0.8, 2.5))
    texts = _legend_texts(fig)
    assert "KDE mode: binaries 0.80, field 2.50" in texts
    assert f"median: binaries {np.median(db):.2f}, field {np.median(dfield):.2f}" in texts
    assert "field / binary (right axis)" in texts
    styles = {line.get_linestyle() for line in fig.axes[0].get_lines()}
    assert {"--", ":"} <= styles


# ----------------------------------------------------------------------------- Figs 10-12
def _disk(rng, n=6000):
    R = rng.uniform(0.5, 15.0, n)
    phi = rng.uniform(-np.pi, np.pi, n)
    return pd.DataFrame({"R": R, "z": rng.normal(0, 1.0, n), "X": R * np.cos(phi),
                         "Y": R * np.sin(phi), "vphi": rng.normal(220, 30, n),
                         "Jz": rng.exponential(10, n), "logg": rng.uniform(1, 3, n),
                         "fe_h": -0.06 * (R - 8) + rng.normal(0, 0.1, n),
                         "teff": rng.normal(4800, 200, n)})


def test_maps_name_units_frames_and_saturation(rng):
    df = _disk(rng)
    rz = maps.rz_maps(df, ["fe_h", "teff"], step=(1.0, 1.0), min_count=3)
    fig = science.rz_maps_figure(rz, ["fe_h", "teff"], vlims={"fe_h": (-0.2, -0.1)})
    cbs = _colorbars(fig)
    assert [cb.get_ylabel() for cb in cbs] == ["mean [Fe/H] [dex]", r"mean $T_{\rm eff}$ [K]"]
    panel = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.get_visible()][0]
    assert "Galactocentric" in panel.get_xlabel() and "Sun at R = 8" in panel.get_xlabel()
    # [Fe/H] saturates at both ends of the narrow limits: arrows on its colour bar
    fe_cb, teff_cb = _colorbar_objects(fig)
    assert fe_cb.extend == "both" and teff_cb.extend == "both"  # 2-98th percentiles saturate
    assert any(t.startswith("Sun (8, 0.025)") for t in _legend_texts(fig))

    xy = maps.xy_maps(df, ["fe_h"], X_range=(-2.0, 16.0), Y_range=(-8.0, 8.0), min_count=2)
    fig = science.xy_maps_figure(xy, ["fe_h"])
    ax = fig.axes[0]
    assert "Sun at X = +8" in ax.get_xlabel()
    assert any(t.get_text() == "GC" for t in ax.texts)
    assert "Galactic centre (GC)" in _legend_texts(fig)
    # a map that does not reach the centre does not mark it
    far = maps.xy_maps(df, ["fe_h"], X_range=(4.0, 12.0), Y_range=(-4.0, 4.0), min_count=2)
    assert not any(t.get_text() == "GC" for t in science.xy_maps_figure(far).axes[0].texts)

    rv = maps.rvphi_maps(df, ["fe_h"], min_count=1, step=(1.0, 10.0))
    fig = science.rvphi_maps_figure(rv, ["fe_h"], ridge_box=(9, 11, 200, 220))
    assert "with the rotation" in fig.axes[0].get_ylabel()


# ----------------------------------------------------------------------------- Figs 13, 14
def _halo(rng, n=3000):
    df = _disk(rng, n)
    df["R"] = rng.uniform(3, 13, n)
    df["z"] = rng.uniform(-6, 6, n)
    df["vphi"] = rng.normal(100, 150, n)
    df["JR"] = rng.exponential(100, n)
    df["eu_fe"] = rng.normal(0.2, 0.1, n)
    return maps.halo_sample(df, "eu_fe", seed=0, n_per_bin=100)


def test_halo_transition_diverging_map_centred_on_zero(rng):
    sample = _halo(rng)
    fig = science.halo_transition_figure(sample, "eu_fe", color_by="vphi", clim=(-100.0, 250.0))
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    norm = panels[0].collections[0].norm
    assert isinstance(norm, TwoSlopeNorm) and norm.vcenter == 0.0
    cb = _colorbars(fig)[0]
    assert cb.get_ylabel() == r"$v_\phi$ [km/s] (centred on 0)"
    assert _colorbar_objects(fig)[0].extend == "both"   # N(100, 150) saturates both ends
    text = " ".join(t.get_text() for ax in panels for t in ax.texts)
    assert "3 < R < 5 kpc" in text and "0 < |z| < 2 kpc" in text and "N = " in text

    fig = science.halo_transition_figure(sample, "eu_fe", color_by="JR", cmap="viridis",
                                         clim=(0.0, float(np.percentile(sample["JR"], 90))))
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert not isinstance(panels[0].collections[0].norm, TwoSlopeNorm)
    assert _colorbar_objects(fig)[0].extend == "max"
    assert _colorbars(fig)[0].get_ylabel() == "$J_R$ [kpc km/s]"


def test_halo_bin_table_is_labelled_in_kpc(rng):
    sample = _halo(rng)
    counts = science.halo_bin_table(sample)
    assert list(counts.index) == ["3 < R < 5 kpc", "7 < R < 9 kpc", "11 < R < 13 kpc"]
    assert list(counts.columns) == ["0 < |z| < 2 kpc", "2 < |z| < 4 kpc", "4 < |z| < 6 kpc"]
    assert counts.to_numpy().sum() == len(sample)
    means = science.halo_bin_table(sample, "fe_h", agg="mean")
    assert means.shape == (3, 3)


# ----------------------------------------------------------------------------- Fig 17
def test_cluster_trend_running_median_and_dispersions(rng):
    teff = rng.uniform(4800, 6400, 200)
    alpha = 0.2 * ((teff - 5600) / 800) ** 2 + rng.normal(0, 0.02, teff.size)  # not straight
    fig = science.cluster_trend_figure(teff, alpha)
    ax = fig.axes[0]
    title = ax.get_title()
    assert "total dispersion" in title and "about the line" in title
    assert "about the running median" in title
    about_line = float(title.split("about the line ")[1].split()[0].rstrip(";"))
    about_median = float(title.split("about the running median ")[1].split()[0])
    assert about_median < 0.7 * about_line          # the running median follows the curve
    assert any(t.startswith("running median") for t in _legend_texts(fig))
    assert ax.get_ylabel().endswith("[dex]")
    xm, ym = science.running_median(teff, alpha, n_per_bin=25)
    assert xm.size == 8 and np.all(np.diff(xm) > 0)
    straight = science.cluster_trend_figure(teff[:8], alpha[:8])   # too few for a running median
    assert "running median" not in straight.axes[0].get_title()


# ----------------------------------------------------------------------------- Figs 15, 16
def test_coefficients_name_the_units_of_theta(rng):
    w = 10 ** (3.5682 + 1e-4 * np.arange(3909))
    from lamostcannon.cannon import LabelScaler

    model = types.SimpleNamespace(wavelength=w, label_names=("teff", "mg_fe"),
                                  theta=rng.normal(size=(w.size, 6)), s2=np.full(w.size, 1e-4),
                                  pixel_ok=np.ones(w.size, bool),
                                  scaler=LabelScaler([5000.0, 0.1], [512.0, 0.08]))
    fig = training.coefficients_vs_wavelength(model, title="dwarf model")
    ylabels = [ax.get_ylabel() for ax in fig.axes]
    assert "(1 sd = 512 K)" in ylabels[1] and "(1 sd = 0.08 dex)" in ylabels[2]
    note = " ".join(t.get_text() for t in fig.texts)
    assert "normalised flux per +1 training-set standard deviation" in note
    assert fig.axes[-1].get_xlim()[0] >= 4000.0
    del model.scaler                                   # models without a scaler still draw
    assert isinstance(training.coefficients_vs_wavelength(model), Figure)


# ----------------------------------------------------------------------------- the figure map
def test_readme_figure_map_is_the_generated_one():
    from pathlib import Path

    from lamostcannon.plotting import figure_map

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert figure_map.readme_block(readme) == figure_map.markdown_table(), \
        "README figure map is stale: run `python -m lamostcannon figure-map --readme`"


def test_every_figure_a_notebook_saves_is_in_the_map():
    """Each ``plotting.savefig(fig, "<name>")`` of a notebook names a figure of the map, written by
    that notebook (f-string names are matched as patterns), and each mapped figure is saved."""
    import json
    import re
    from pathlib import Path

    from lamostcannon.plotting import figure_map

    saved = {}
    for nb_path in sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb")):
        src = "\n".join("".join(c["source"]) for c in json.loads(nb_path.read_text())["cells"]
                        if c["cell_type"] == "code")
        for f, name in re.findall(r"savefig\(\s*\w+\s*,\s*(f?)\"([^\"]+)\"", src):
            pattern = re.sub(r"\\\{[^}]*\\\}", ".+", re.escape(name)) if f else re.escape(name)
            saved.setdefault(nb_path.name[:2], []).append(pattern)
    assert saved, "no savefig calls found"
    for nb, patterns in saved.items():
        mapped = [e.name for e in figure_map.figures_of_notebook(nb)]
        for pattern in patterns:
            assert any(re.fullmatch(pattern, m) for m in mapped), (nb, pattern, mapped)
        for m in mapped:
            assert any(re.fullmatch(p, m) for p in patterns), (nb, m, "mapped but never saved")
    for e in figure_map.FIGURES:
        assert figure_map.paper_figure_text(e.name)
    assert figure_map.paper_figure_text("cross_validation_dwarf_model") == "paper Fig. 5"
    assert figure_map.paper_figure_text("model_vs_data_giants").startswith("one panel of paper Fig. 8")
    assert figure_map.paper_figure_text("real_cv_one_to_one") == "not in the paper"
    assert figure_map.paper_figure_text("no_such_figure") == ""


def test_setup_names_the_data_a_notebook_reads(monkeypatch):
    monkeypatch.setenv("LAMOSTCANNON_SOURCE", "mock")
    assert "source=mock" in plotting.setup()
    line = plotting.setup(data="real LAMOST DR10 spectra")
    assert "data=real LAMOST DR10 spectra" in line and "source=" not in line
