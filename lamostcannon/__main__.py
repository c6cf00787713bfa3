"""Command line: ``python -m lamostcannon <command>``.

Commands
--------
reproduce
    Execute every notebook in ``notebooks/`` in order (01, 02, ...) and write the executed copies
    to ``build/notebooks/``; the notebooks themselves write ``data/`` and ``figures/``.
label
    Label LAMOST spectra with a trained model (see ``python -m lamostcannon label --help``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import paths


def _reproduce(args) -> int:
    import nbformat
    from nbclient import NotebookClient

    notebooks = sorted((paths.ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(o) for o in args.only)]
    if not notebooks:
        print("no notebooks found in", paths.ROOT / "notebooks", file=sys.stderr)
        return 1
    out_dir = paths.ensure(paths.ROOT / "build" / "notebooks")
    total = time.perf_counter()
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
            nbformat.write(nb, out_dir / nb_path.name)
            print(f"[reproduce] {nb_path.name} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            print(f"[reproduce] partial output in {out_dir / nb_path.name}", file=sys.stderr)
            return 1
        nbformat.write(nb, out_dir / nb_path.name)
        print(f"[reproduce] {nb_path.name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"[reproduce] all {len(notebooks)} notebooks in {time.perf_counter() - total:.0f} s; "
          f"figures in {paths.figures_dir()}, executed notebooks in {out_dir}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lamostcannon", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser("reproduce", help="execute the notebooks in order")
    rep.add_argument("--only", nargs="*", help="notebook number prefixes to run, e.g. 01 02")
    rep.add_argument("--cell-timeout", type=int, default=3600, help="seconds per cell")
    rep.set_defaults(func=_reproduce)

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
