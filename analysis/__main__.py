"""Regenerate every table and figure: run each notebook in analysis/ on the given result tables.

    python -m analysis                                   # results/*.parquet → analysis/out/
    python -m analysis --results SWEEP_DIR/results.parquet 'other/*.parquet' --out /tmp/report
    python -m analysis --only memory throughput          # some notebooks

Each notebook writes `<out>/<experiment>.{md,tex}` tables and `<out>/<experiment>.{png,pdf}` figures, and
`<out>/index.html` shows them all on one page (grouped by notebook, with provenance and the command that regenerates
each). A notebook that raises is reported and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import runpy
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def notebooks() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if not p.name.startswith("_"))


def _shown(path: str) -> str:
    """A result file as the index page names it: relative to the checkout when inside it, else its name."""
    full = Path(path).resolve()
    try:
        return str(full.relative_to(HERE.parent))
    except ValueError:
        return full.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", help="parquet files or globs (default: results/*.parquet)")
    parser.add_argument("--out", type=Path, help="output folder (default: analysis/out)")
    parser.add_argument("--only", nargs="+", help="notebook names to run (default: all)")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from lorafa import report

    p = report.set_params(args.results, args.out)
    import glob

    if not any(glob.glob(str(pattern)) for pattern in p.results):
        parser.error(f"no result table matches {p.results}")
    chosen = [nb for nb in notebooks() if not args.only or nb.stem in args.only]
    if args.only and len(chosen) != len(args.only):
        parser.error(f"unknown notebook in {args.only}; available: {[nb.stem for nb in notebooks()]}")
    before = {f: f.stat().st_mtime for f in p.out.glob("*")} if p.out.is_dir() else {}
    failed = []
    report._WRITTEN.clear()
    for nb in chosen:
        started = time.perf_counter()
        report.start_notebook(nb.stem)
        try:
            runpy.run_path(str(nb), run_name="__main__")
            print(f"{nb.stem:22s} ok     {time.perf_counter() - started:5.1f} s")
        except Exception:  # noqa: BLE001 - report it, run the rest, fail at the end
            failed.append(nb.stem)
            print(f"{nb.stem:22s} FAILED\n{traceback.format_exc()}", file=sys.stderr)
    sources = sorted({_shown(f) for pattern in p.results for f in glob.glob(str(pattern))})
    report.write_index(p.out, [nb.stem for nb in chosen], failed, sources)
    written = sorted(f for f in p.out.glob("*") if before.get(f) != f.stat().st_mtime)
    kinds = {ext: sum(f.suffix == ext for f in written) for ext in (".md", ".tex", ".png", ".pdf")}
    print(f"{len(written)} files → {p.out}: {kinds['.md']} tables (.md + {kinds['.tex']} .tex), "
          f"{kinds['.png']} figures (.png + {kinds['.pdf']} .pdf); all on one page: {p.out / 'index.html'}")
    if failed:
        print(f"failed notebooks: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
