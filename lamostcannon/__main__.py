"""Command line: ``python -m lamostcannon <command>``.

Commands
--------
reproduce
    Execute every notebook in ``notebooks/`` in order (01, 02, ...) and write the executed copies
    to ``build/notebooks/`` (progress bars finished, :func:`lamostcannon.nbtools.tidy_executed`);
    the notebooks themselves write ``data/`` and ``figures/`` and their claims
    (``build/claims/``), which are gathered into ``build/claims.{md,csv,json}``.
site
    Build the static site ``build/site/`` from the executed notebooks (nothing is executed).
claims
    Gather the notebooks' claims again; ``--readme`` writes the table into the README.
figure-map
    Print the README's figure map (from :mod:`lamostcannon.plotting.figure_map`); ``--readme``
    writes it into the README.
label
    Label LAMOST spectra with a trained model (see ``python -m lamostcannon label --help``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import paths


def _gather_claims() -> str:
    from . import claims

    table = claims.gather()
    written = claims.write_table(table)
    return f"{claims.summary(table)} -> {written['md'].relative_to(paths.ROOT)}"


def _reproduce(args) -> int:
    import nbformat
    from nbclient import NotebookClient

    from .nbtools import tidy_executed

    notebooks = sorted((paths.ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(o) for o in args.only)]
    if not notebooks:
        print("no notebooks found in", paths.ROOT / "notebooks", file=sys.stderr)
        return 1
    out_dir = paths.ensure(paths.ROOT / "build" / "notebooks")
    total = time.perf_counter()
    status = 0
    for nb_path in notebooks:
        if nb_path.name.startswith("09_"):  # the only notebook that needs the real spectra
            from .real import RealDataMissing, real_sources

            try:
                real_sources()
            except RealDataMissing as exc:
                print(f"[reproduce] {nb_path.name} skipped: {exc}", flush=True)
                continue
        t0 = time.perf_counter()
        print(f"[reproduce] {nb_path.name} ...", flush=True)
        nb = nbformat.read(nb_path, as_version=4)
        client = NotebookClient(
            nb, timeout=args.cell_timeout, kernel_name="python3",
            resources={"metadata": {"path": str(nb_path.parent)}},
        )
        try:
            client.execute()
        except Exception as exc:  # report which notebook failed, keep the partial output
            nbformat.write(tidy_executed(nb), out_dir / nb_path.name)
            print(f"[reproduce] {nb_path.name} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            print(f"[reproduce] partial output in {out_dir / nb_path.name}", file=sys.stderr)
            status = 1
            break
        nbformat.write(tidy_executed(nb), out_dir / nb_path.name)
        print(f"[reproduce] {nb_path.name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"[reproduce] claims: {_gather_claims()}", flush=True)
    if status == 0:
        print(f"[reproduce] all {len(notebooks)} notebooks in {time.perf_counter() - total:.0f} s; "
              f"figures in {paths.figures_dir()}, executed notebooks in {out_dir}; "
              "`make site` builds the HTML site from them")
    return status


def _site(args) -> int:
    from .site import build_site

    try:
        report = build_site(args.notebooks, args.out)
    except FileNotFoundError as exc:
        print(f"[site] {exc}", file=sys.stderr)
        return 1
    missing = (f"; not executed: {', '.join(report.not_executed)}" if report.not_executed else "")
    print(f"[site] {len(report.pages)} pages, {len(report.figures)} figures -> {report.index}"
          f"{missing}")
    return 0


def _claims(args) -> int:
    from . import claims

    table = claims.gather()
    written = claims.write_table(table)
    print(f"[claims] {claims.summary(table)} -> {written['md']}")
    if args.readme:
        changed = claims.update_readme(table)
        print(f"[claims] README.md {'updated' if changed else 'already up to date'}")
    return 0


def _figure_map(args) -> int:
    from .plotting import figure_map

    if args.readme:
        changed = figure_map.update_readme(paths.ROOT / "README.md")
        print(f"[figure-map] README.md {'updated' if changed else 'already up to date'}")
    else:
        print(figure_map.markdown_table(), end="")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lamostcannon", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser("reproduce", help="execute the notebooks in order")
    rep.add_argument("--only", nargs="*", help="notebook number prefixes to run, e.g. 01 02")
    rep.add_argument("--cell-timeout", type=int, default=3600, help="seconds per cell")
    rep.set_defaults(func=_reproduce)

    site = sub.add_parser("site", help="build the static HTML site from the executed notebooks")
    site.add_argument("--notebooks", type=Path, default=None,
                      help="executed notebooks (default build/notebooks)")
    site.add_argument("--out", type=Path, default=None, help="site folder (default build/site)")
    site.set_defaults(func=_site)

    cl = sub.add_parser("claims", help="gather the notebooks' claims into build/claims.*")
    cl.add_argument("--readme", action="store_true", help="also write the table into README.md")
    cl.set_defaults(func=_claims)

    fm = sub.add_parser("figure-map", help="print the README's figure map")
    fm.add_argument("--readme", action="store_true", help="write it into README.md")
    fm.set_defaults(func=_figure_map)

    try:
        from .cli import add_label_command
    except ImportError:  # pragma: no cover - the label command lives in lamostcannon.cli
        add_label_command = None
    if add_label_command is not None:
        add_label_command(sub)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
