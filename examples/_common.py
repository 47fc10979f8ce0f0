"""Helpers the example scripts share: validated numbers, ``--out`` / ``--quiet``, progress, tables.

An example uses them as::

    from _common import add_output_args, output_dir, positive_int, progress, table

    p = argparse.ArgumentParser(description=...)
    p.add_argument("--epochs", type=positive_int, default=30)   # argparse error for 0, -1, "x"
    add_output_args(p)                                          # --out DIR, --quiet
    args = p.parse_args()
    for epoch in progress(range(args.epochs), args, desc="epochs"):   # tqdm bar unless --quiet
        ...
    print(table(["method", "loss"], [["sum", 0.123456]]))      # aligned columns, 4 decimals
    out = output_dir(args, "myexample")     # args.out, or a fresh ./myexample-out-<n>/, printed

* Numbers are checked by the ``type=`` functions (:func:`positive_int`, :func:`nonnegative_int`,
  :func:`positive_float`, :func:`nonnegative_float`, :func:`seed_list`): a bad value is an
  ordinary argparse error naming the option, before anything runs.
* Files are written only into :func:`output_dir`: the ``--out`` folder if given, else a new
  folder under the current directory (never an existing one); its path is printed.  Call it only
  when there is something to write.
* :func:`progress` shows a ``tqdm`` bar on stderr (``pip install "torch_mtlgrad[examples]"``);
  without tqdm, or with ``--quiet``, it is the iterable itself.
* :func:`table` pads every column to its widest cell, so values never run together.

The examples import this module by its file name (``examples/`` is on ``sys.path`` when a
script in it runs).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "add_output_args", "nonnegative_float", "nonnegative_int", "output_dir", "positive_float",
    "positive_int", "progress", "seed_list", "table",
]

_T = TypeVar("_T")


def _number(kind: type, text: str, *, minimum: float, strict: bool) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    if value < minimum or (strict and value == minimum):
        raise argparse.ArgumentTypeError(
            f"must be {'>' if strict else '>='} {minimum:g}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type=``: an integer > 0."""
    return _number(int, text, minimum=0, strict=True)


def nonnegative_int(text: str) -> int:
    """argparse ``type=``: an integer >= 0."""
    return _number(int, text, minimum=0, strict=False)


def positive_float(text: str) -> float:
    """argparse ``type=``: a finite number > 0."""
    return _number(float, text, minimum=0.0, strict=True)


def nonnegative_float(text: str) -> float:
    """argparse ``type=``: a finite number >= 0."""
    return _number(float, text, minimum=0.0, strict=False)


def seed_list(text: str) -> list[int]:
    """argparse ``type=``: comma-separated integer seeds, e.g. ``0,1,2`` (no repeats)."""
    try:
        seeds = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is repeated in {text!r}")
    return seeds


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--out DIR`` (where files go) and ``--quiet`` (no progress bars)."""
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for the figures and tables (created if missing); default: "
                             "a new folder under the current directory, printed")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def output_dir(args: argparse.Namespace, name: str) -> Path:
    """The folder to write into: ``args.out`` (created if missing), else a new
    ``./<name>-out-<n>`` (the first ``n`` not taken).  Prints where it is."""
    if args.out is not None:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise SystemExit(f"--out {args.out}: exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
    else:
        n = 1
        while True:
            out = Path.cwd() / f"{name}-out-{n}"
            try:
                out.mkdir()
                break
            except FileExistsError:
                n += 1
    print(f"writing files into {out}")
    return out


def progress(iterable: Iterable[_T], args: argparse.Namespace, **tqdm_kwargs: Any) -> Iterator[_T]:
    """``tqdm(iterable, **tqdm_kwargs)`` unless ``args.quiet`` or tqdm is not installed."""
    if not getattr(args, "quiet", False):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            return iter(tqdm(iterable, leave=False, **tqdm_kwargs))
    return iter(iterable)


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, digits: int = 4) -> str:
    """A plain-text table: floats with ``digits`` decimals, every column as wide as its widest
    cell plus two spaces; the first column left-aligned, the others right-aligned."""
    cells = [[_cell(v, digits) for v in row] for row in rows]
    if any(len(row) != len(headers) for row in cells):
        raise ValueError(f"every row needs {len(headers)} cells (the headers)")
    widths = [max(len(str(h)), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    lines = []
    for row in [list(map(str, headers)), ["-" * w for w in widths], *cells]:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines)
