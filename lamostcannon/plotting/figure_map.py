"""Which paper figure each saved figure is: the one place that maps figure files to Wheeler et
al. (2020) figure numbers and to the notebook that writes them.

The README's figure map is generated from :data:`FIGURES` (``python -m lamostcannon figure-map``;
a test checks that the README holds the current table), :func:`lamostcannon.plotting.savefig`
captions every figure it shows with :func:`paper_figure_text`, and the static site
(:mod:`lamostcannon.site`) puts the paper figure number on each figure and builds its index from
the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Titles of the paper's figures (what each shows), by number.
PAPER_TITLES = {
    1: "survey coverage, face on and edge on",
    2: "GALAH and LAMOST spectra of one star",
    3: "Kiel diagram of the reference set",
    4: "the model as a graphical model",
    5: "cross-validation, dwarf model",
    6: "cross-validation, giant model",
    7: "precision relative to the unbiased range",
    8: "model fits across the catalogue",
    9: "wide binaries against field pairs",
    10: "(R, z) maps of the giants",
    11: "thin-disk (X, Y) maps",
    12: "thin-disk (R, v_phi) maps",
    13: "[Ba/Fe] halo transition, coloured by J_R",
    14: "[Eu/Fe] halo transition, coloured by v_phi",
    15: "model coefficients and scatter, dwarf model",
    16: "model coefficients and scatter, giant model",
    17: "Praesepe [alpha/Fe] against teff",
}

#: Paper figures no notebook draws, and where their content is instead.
NOT_DRAWN = {4: "a diagram; the equations are in `lamostcannon/cannon.py`'s docstrings"}


@dataclass(frozen=True)
class FigureEntry:
    """One figure file.

    Attributes
    ----------
    name : file stem in ``figures/`` (what :func:`lamostcannon.plotting.savefig` is given)
    notebook : number prefix of the notebook that writes it, e.g. ``"04"``
    paper : paper figure numbers it reproduces (empty: not in the paper)
    role : ``"figure"`` (the paper's figure, on our data), ``"companion"`` (a figure that helps
        read it, e.g. against the mock truth) or ``"panel"`` (one panel of it)
    what : a few words on what it shows
    """

    name: str
    notebook: str
    paper: tuple[int, ...] = ()
    role: str = "figure"
    what: str = ""


#: Every figure the notebooks write, in notebook order.
FIGURES = (
    FigureEntry("survey_coverage_face_on_edge_on", "01", (1,), "figure", "mock truth"),
    FigureEntry("raw_sky_footprints", "01", (1,), "companion", "the two surveys on the sky"),
    FigureEntry("mock_truth_alpha_feh", "01", (), "", "the mock's [alpha/Fe]-[Fe/H] sequences"),
    FigureEntry("mock_truth_kiel", "01", (), "", "the mock's true Kiel diagram"),
    FigureEntry("mock_vs_real_lamost_spectra", "01", (), "", "mock against real LAMOST spectra"),
    FigureEntry("realism_scatter_real_vs_mock", "01", (), "",
                "intrinsic scatter of real DR10 spectra and of their mock twins"),
    FigureEntry("realism_classifier_weight_map", "01", (), "",
                "where a classifier tells mock twins from real spectra"),
    FigureEntry("realism_cool_dwarf_through_the_model", "01", (), "",
                "a real cool dwarf and its twin fitted by a real-trained model"),
    FigureEntry("galah_vs_lamost_spectrum_same_star", "03", (2,)),
    FigureEntry("kiel_diagram_reference_set", "02", (3,)),
    FigureEntry("model_vs_data_dwarfs", "03", (8,), "panel", "training stars against the model"),
    FigureEntry("model_vs_data_giants", "03", (8,), "panel", "training stars against the model"),
    FigureEntry("cannon_coefficients_dwarf_model", "03", (15,)),
    FigureEntry("cannon_coefficients_giant_model", "03", (16,)),
    FigureEntry("scatter_mock_models_vs_real_model", "03", (15, 16), "companion",
                "the models' scatter against the real-spectra model's"),
    FigureEntry("kde_extrapolation_boundary_dwarf_fe_h", "04", (7,), "companion",
                "how one KDE boundary is found"),
    FigureEntry("cross_validation_dwarf_model", "04", (5,)),
    FigureEntry("cross_validation_giant_model", "04", (6,)),
    FigureEntry("precision_relative_to_unbiased_range", "04", (7,)),
    FigureEntry("cross_validation_dwarf_model_vs_mock_truth", "04", (5,), "companion",
                "against the mock truth"),
    FigureEntry("cross_validation_giant_model_vs_mock_truth", "04", (6,), "companion",
                "against the mock truth"),
    FigureEntry("cv_pulls_formal_vs_calibrated_dwarf", "04", (5,), "companion",
                "held-out pulls, formal and calibrated errors"),
    FigureEntry("cv_pulls_formal_vs_calibrated_giant", "04", (6,), "companion",
                "held-out pulls, formal and calibrated errors"),
    FigureEntry("catalog_kiel_diagram_feh", "05", (8,), "companion", "the catalogue's Kiel diagram"),
    FigureEntry("catalog_model_fits_across_kiel", "05", (8,)),
    FigureEntry("catalog_label_distributions", "05", (), "", "label histograms"),
    FigureEntry("catalog_flag_fractions", "05", (), "", "fraction of stars with each flag"),
    FigureEntry("catalog_truth_recovery", "05", (), "", "catalogue against the mock truth"),
    FigureEntry("calibration_corrections_vs_teff", "06", (), "",
                "the dwarfs' temperature calibration against teff"),
    FigureEntry("praesepe_alpha_fe_vs_teff", "06", (17,), "figure", "raw and calibrated"),
    FigureEntry("praesepe_abundances_vs_teff_raw_and_calibrated", "06", (17,), "companion",
                "every dwarf abundance, raw and calibrated"),
    FigureEntry("wide_binaries_chemical_distance_raw_and_calibrated", "06", (9,), "companion",
                "raw and calibrated, with and without the teff cut, null control"),
    FigureEntry("wide_binaries_chemical_distance", "06", (9,)),
    FigureEntry("giants_mean_labels_R_z", "07", (10,)),
    FigureEntry("thin_disk_giants_mean_labels_X_Y", "07", (11,)),
    FigureEntry("thin_disk_giants_mean_labels_R_vphi", "07", (12,)),
    FigureEntry("ba_fe_vs_fe_h_by_R_absz_coloured_by_JR", "08", (13,)),
    FigureEntry("eu_fe_vs_fe_h_by_R_absz_coloured_by_vphi", "08", (14,)),
    FigureEntry("real_cv_one_to_one", "09", (), "", "12-fold CV on real spectra"),
    FigureEntry("real_model_vs_data", "09", (), "", "real spectra against the model"),
    FigureEntry("real_pulls_cv_and_repeat_pairs", "09", (), "",
                "held-out pulls of CV residuals and DR8 repeat pairs, formal and calibrated"),
    FigureEntry("real_ood_scores_by_kind", "09", (), "",
                "out-of-distribution score of good, hot, M dwarf, non-star and spoiled spectra"),
    FigureEntry("real_flagged_model_spectra", "09", (), "",
                "what the flag caught: data and best-fit model of an M dwarf and a galaxy"),
)

_BY_NAME = {f.name: f for f in FIGURES}


def entry(name: str) -> FigureEntry | None:
    """The :class:`FigureEntry` of a figure file stem (``None`` if it is not in the map)."""
    return _BY_NAME.get(name)


def paper_figure(name: str) -> str | None:
    """The paper figure number(s) of a figure file as text (``"5"``, ``"15, 16"``), or None."""
    e = entry(name)
    return ", ".join(str(n) for n in e.paper) if e and e.paper else None


def paper_figure_text(name: str) -> str:
    """A reader's caption: ``"paper Fig. 10"``, ``"companion of paper Fig. 7: how one KDE
    boundary is found"``, ``"one panel of paper Fig. 8"``, ``"not in the paper"``, or ``""`` for a
    figure missing from the map."""
    e = entry(name)
    if e is None:
        return ""
    if not e.paper:
        return "not in the paper"
    nums = ", ".join(str(n) for n in e.paper)
    fig = f"paper Fig{'s' if len(e.paper) > 1 else ''}. {nums}"
    if e.role == "companion":
        return f"companion of {fig}" + (f": {e.what}" if e.what else "")
    if e.role == "panel":
        return f"one panel of {fig}" + (f": {e.what}" if e.what else "")
    return fig


def figures_of_notebook(prefix: str) -> list[FigureEntry]:
    """The entries written by the notebook with number ``prefix`` (``"04"``)."""
    return [f for f in FIGURES if f.notebook == prefix]


def markdown_table() -> str:
    """The README's figure map: one row per paper figure (files, notebook), then the figures
    that are not in the paper. Generated; ``python -m lamostcannon figure-map`` prints it."""
    rows = ["| paper figure | file in `figures/` | notebook |", "|---|---|---|"]
    for num, title in PAPER_TITLES.items():
        files = [f for f in FIGURES if num in f.paper]
        if not files:
            rows.append(f"| {num}: {title} | ({NOT_DRAWN.get(num, 'not drawn')}) | |")
            continue
        cells = []
        for f in files:
            note = {"companion": f" (companion: {f.what})", "panel": f" (panel: {f.what})"}.get(
                f.role, f" ({f.what})" if f.what else "")
            cells.append(f"`{f.name}.png`{note}")
        nbs = ", ".join(sorted({f.notebook for f in files}))
        rows.append(f"| {num}: {title} | {', '.join(cells)} | {nbs} |")
    others = [f for f in FIGURES if not f.paper]
    by_nb: dict[str, list[str]] = {}
    for f in others:
        by_nb.setdefault(f.notebook, []).append(f"`{f.name}.png`")
    text = "; ".join(f"{', '.join(v)} ({k})" for k, v in by_nb.items())
    rows.append(f"| (not in the paper) | {text} | |")
    return "\n".join(rows) + "\n"


#: Markers of the generated figure map in the README.
README_BEGIN = "<!-- figure map: generated by `python -m lamostcannon figure-map --readme` -->"
README_END = "<!-- end of figure map -->"


def readme_block(readme_text: str) -> str:
    """The text between :data:`README_BEGIN` and :data:`README_END` ('' when absent)."""
    if README_BEGIN not in readme_text or README_END not in readme_text:
        return ""
    return readme_text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip("\n") + "\n"


def update_readme(readme) -> bool:
    """Write :func:`markdown_table` between the README's markers; True when it changed."""
    from pathlib import Path

    readme = Path(readme)
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme} has no figure-map block ({README_BEGIN!r} ... {README_END!r})")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_BEGIN}\n{markdown_table()}{README_END}{tail}"
    if new != text:
        readme.write_text(new)
        return True
    return False
