"""``python -m torch_mtlgrad``: the methods table, and the repository's examples.

* ``python -m torch_mtlgrad`` (or ``... methods``): every method with what it reads, its scale
  convention, whether it is stateful or random, and its paper (:mod:`torch_mtlgrad.catalog`);
  ``--markdown`` for the Markdown table, ``--reads losses|gramian|jacobian`` to keep the methods
  that read that, ``--write FILE`` / ``--check FILE`` to regenerate / compare the table between
  the marker comments of a Markdown file (the README's).
* ``python -m torch_mtlgrad run EXAMPLE [ARGS...]``: runs ``examples/EXAMPLE.py`` of the
  repository with ``ARGS`` (``run`` alone, or an unknown name, lists the examples; ``run EXAMPLE
  --help`` shows the example's own options).  The examples are not part of the installed package:
  from an installed copy without the repository this says where they are.

Every command takes ``--help``.

Example:
    >>> main(["methods", "--reads", "losses"])  # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
    name ... paper
    mean ...
    0
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["examples", "main"]

# The examples/ folder of the checkout this package runs from (an installed copy has none: its
# parent folder is site-packages, which holds no setup.cfg of this project).
_ROOT = Path(__file__).resolve().parents[1]
REPOSITORY_EXAMPLES = _ROOT / "examples"
IN_REPOSITORY = (_ROOT / "setup.cfg").is_file() and "name = torch_mtlgrad" in (
    _ROOT / "setup.cfg").read_text(encoding="utf-8", errors="replace")
NOT_INSTALLED = ("the examples are not installed with the package: they are the examples/ folder "
                 "of the torch_mtlgrad repository (a git checkout); run them from there, e.g. "
                 "`python examples/quickstart.py`, or `python -m torch_mtlgrad run quickstart` "
                 "with the package installed from that checkout (`pip install -e .`)")


def examples(folder: Path = REPOSITORY_EXAMPLES) -> dict[str, str]:
    """The runnable examples of ``folder``: name -> the first line of its docstring (files whose
    name starts with ``_`` are helpers, not examples); empty when the folder is absent."""
    if not folder.is_dir():
        return {}
    out = {}
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        except SyntaxError:
            doc = ""
        out[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return out


def _listing(found: dict[str, str]) -> str:
    width = max(map(len, found))
    return "\n".join(f"  {name.ljust(width)}  {line}" for name, line in found.items())


def _methods(args: argparse.Namespace) -> int:
    from . import catalog

    if args.write or args.check:
        if args.reads:
            print("error: --write and --check take the whole table (no --reads)", file=sys.stderr)
            return 2
        for path in args.write or ():
            changed = catalog.update_file(path)
            print(f"{path}: {'methods table regenerated' if changed else 'up to date'}")
        status = 0
        for path in args.check or ():
            diff = catalog.check_file(path)
            if diff:
                print("\n".join(diff))
                print(f"{path}: the methods table differs from the registry's; regenerate it with "
                      f"`python -m torch_mtlgrad methods --write {path}`", file=sys.stderr)
                status = 1
            else:
                print(f"{path}: up to date")
        return status
    render = catalog.render_markdown if args.markdown else catalog.render_text
    print(render(reads=args.reads), end="")
    return 0


def _run(args: argparse.Namespace, folder: Path) -> int:
    found = examples(folder)
    if not found:
        print(f"error: no examples at {folder}: {NOT_INSTALLED}", file=sys.stderr)
        return 2
    if args.example is None:
        print(f"examples in {folder} (python -m torch_mtlgrad run NAME [ARGS...]):")
        print(_listing(found))
        return 0
    name = args.example.removesuffix(".py")
    if name not in found:
        print(f"error: no example {args.example!r}; the examples in {folder} are:\n"
              f"{_listing(found)}", file=sys.stderr)
        return 2
    # A separate interpreter, as `python examples/NAME.py ARGS` would run it (the examples import
    # their helpers from their own folder).
    return subprocess.call([sys.executable, str(folder / f"{name}.py"), *args.args])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m torch_mtlgrad",
        description="torch_mtlgrad: multi-task gradient combination for PyTorch.  Without a "
                    "command, prints the methods table (the 'methods' command).")
    sub = parser.add_subparsers(dest="command", metavar="{methods,run}")
    m = sub.add_parser(
        "methods", help="the methods: name, what it reads, scale, state, paper (the default)",
        description="Every method under its aggregator= name, built from the classes and the "
                    "registry: what a step must build for it (reads: nothing / losses, G = J J^T "
                    "or J), its scale convention, whether it keeps state or draws random numbers, "
                    "and its paper.")
    m.add_argument("--markdown", action="store_true",
                   help="the Markdown table (with the method's summary, +tension and aliases)")
    from .catalog import READS

    m.add_argument("--reads", metavar="WHAT",
                   help="only the methods that read WHAT: " + "; ".join(
                       f"{k}{' (' + k[0].upper() + ')' if k != 'losses' else ''}: {v}"
                       for k, v in READS.items()))
    m.add_argument("--write", metavar="FILE", action="append",
                   help="regenerate the table between the marker comments of the Markdown FILE "
                        "(e.g. README.md); may be repeated")
    m.add_argument("--check", metavar="FILE", action="append",
                   help="exit 1 (printing the difference) when FILE's table is not the registry's")
    r = sub.add_parser(
        "run", help="run one of the repository's examples: run EXAMPLE [ARGS...]",
        description="Run examples/EXAMPLE.py of the repository with ARGS (in a new Python "
                    "process).  Without EXAMPLE, list the examples; `run EXAMPLE --help` shows "
                    "the example's own options.")
    r.add_argument("example", nargs="?", metavar="EXAMPLE",
                   help="the example's name (e.g. quickstart)")
    r.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="arguments for the example")
    return parser


def main(argv: Sequence[str] | None = None, *, examples_folder: Path | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    ``examples_folder``: where ``run`` looks for examples (default: the repository's
    ``examples/`` next to the package).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["methods", *argv]
    args = parser.parse_args(argv)
    if args.command == "run":
        if examples_folder is None and not IN_REPOSITORY:
            print(f"error: {NOT_INSTALLED}", file=sys.stderr)
            return 2
        return _run(args, REPOSITORY_EXAMPLES if examples_folder is None else examples_folder)
    try:
        return _methods(args)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
