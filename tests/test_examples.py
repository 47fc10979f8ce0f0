"""The examples, each run in a shortened form as a user would run it (a subprocess in an empty
working directory): they finish, print well-formed tables (every column lined up under its
header, no two cells run together) and their closing sentence, write files only into ``--out``
(or, without it, into one new folder under the working directory that they print), and reject
bad arguments with an argparse error.  ``examples/mpps_multitask.py`` runs the configuration that
diverged (``--epochs 3 --seeds 1 --frozen 0``: test MSE ~1e4 before its BatchNorm statistics were
recomputed for the evaluated full backbone).
"""

from __future__ import annotations

import itertools
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(tmp_path: Path, script: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    work = tmp_path / "cwd"
    work.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=work,
                          capture_output=True, text=True, timeout=300, check=False)
    if ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def tables(text: str) -> list[list[list[str]]]:
    """Every table printed by ``examples/_common.table``: rows of cells (header first), cut at the
    columns of its dash line; asserts that nothing is printed between two columns."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        if not re.fullmatch(r"-+(  -+)*", line) or i == 0:
            continue
        spans = [m.span() for m in re.finditer(r"-+", line)]
        rows = []
        for row in [lines[i - 1], *lines[i + 1:]]:
            if not row.strip():
                break
            assert len(row) <= spans[-1][1], f"row longer than the table: {row!r}"
            for (_, end), (start, _) in itertools.pairwise(spans):
                assert row[end:start].strip() == "", f"cells run together: {row!r}"
            rows.append([row[a:b].strip() for a, b in spans])
        assert len(rows) >= 2, f"a table without rows after line {i}"
        found.append(rows)
    return found


def numbers(cells: list[str]) -> list[float]:
    return [float(c.split(" +- ")[0]) for c in cells]


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_quickstart(tmp_path: Path) -> None:
    out = run(tmp_path, "quickstart.py", "--epochs", "2").stdout
    assert "final test loss" in out
    assert re.search(r"^Result: central\+tension .* \(\d\.\d{4} against \d\.\d{4}, \d+% (less|more)\)"
                     r" on one seed of this synthetic problem\.$", out, re.MULTILINE), out[-600:]
    assert not files(tmp_path / "cwd")  # writes nothing


def test_legacy_loop(tmp_path: Path) -> None:
    out = run(tmp_path, "legacy_loop.py", "--epochs", "1").stdout
    assert "largest parameter difference 0 (the same step)" in out
    [table] = tables(out)
    assert table[0] == ["loop", "task 1", "task 2 (10x)", "mean"] and len(table) == 3
    for row in table[1:]:
        a, b, m = numbers(row[1:])
        assert m == pytest.approx((a + b) / 2, abs=1e-4)
    assert re.search(r"^Result: the converted loop with cagrad reached", out, re.MULTILINE)
    assert not files(tmp_path / "cwd")


def test_lightning_module(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    out = run(tmp_path, "lightning_module.py", "--epochs", "2", "--n-train", "256", "--quiet",
              "--out", str(tmp_path / "out")).stdout
    assert f"writing files into {tmp_path / 'out'}" in out
    [table] = tables(out)
    assert [r[0] for r in table] == ["run", "uninterrupted", "resumed at epoch 1"]
    assert table[1][1:] == table[2][1:]  # the resumed run ends where the uninterrupted one does
    assert "ended with exactly the same parameters as the uninterrupted one" in out
    assert "checkpoints/last.ckpt" in files(tmp_path / "out")
    assert not files(tmp_path / "cwd")


def test_mpps_short_run_does_not_diverge(tmp_path: Path) -> None:
    out = run(tmp_path, "mpps_multitask.py", "--epochs", "3", "--seeds", "1", "--frozen", "0",
              "--quiet", "--out", str(tmp_path / "out")).stdout
    [table] = tables(out)
    assert table[0] == ["method", "MSE task0", "MSE task1", "acc task2", "Delta %", "time/run s"]
    assert [r[0] for r in table[1:]] == ["STL", "HPS", "HPS+cagrad", "MPPS-B", "MPPS-G",
                                         "MPPS-B+cagrad"]
    for row in table[1:]:
        mse0, mse1, acc, _, _ = numbers(row[1:])
        assert mse0 < 2 and mse1 < 2 and 0 <= acc <= 1, row  # the unit-variance targets
    # the masks end far from full sharing in 3 epochs: said, not hidden
    assert "warning: MPPS-B's learnt masks ended at EC(phi)" in out
    assert files(tmp_path / "out") == {"mpps_ec_schedule.png", "mpps_layer_shares.png"}
    assert not files(tmp_path / "cwd")


def test_normal_positions_default_out(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = run(tmp_path, "normal_positions.py", "--epochs", "5", "--n-train", "200",
              "--n-test", "400", "--quiet").stdout
    [table] = tables(out)
    assert [r[0] for r in table] == ["model", "HPS", "fixed block (p=1)", "NORMAL"]
    assert all(0 <= v <= 100 for row in table[1:] for v in numbers(row[1:12]))
    # no --out: one new folder under the working directory, printed, holding the figure
    folder = tmp_path / "cwd" / "normal-out-1"
    assert f"writing files into {folder}" in out
    assert files(tmp_path / "cwd") == {"normal-out-1/normal_positions.png"}


def test_conal_grouped_tasks(tmp_path: Path) -> None:
    out = run(tmp_path, "conal_grouped_tasks.py", "--pretrain-steps", "10", "--search-steps", "20",
              "--alpha-warmup", "10", "--pro-steps", "10", "--retrain-steps", "40", "--no-plot",
              "--quiet", "--out", str(tmp_path / "out")).stdout
    conflicts, mse = tables(out)
    assert len(conflicts[0]) == 8 and [r[0] for r in conflicts[1:]] == [
        "HPS (training)", "CoNAL derived (training)", "CoNAL-Pro derived (training)",
        "CoNAL search (raw, eq. 4)"]
    assert [r[0] for r in mse] == ["network", "HPS", "STL", "CoNAL", "CoNAL-Pro"]
    assert files(tmp_path / "out") == {"conal.json"}
    assert not files(tmp_path / "cwd")


@pytest.mark.parametrize(("script", "args", "message"), [
    ("quickstart.py", ["--epochs", "0"], "argument --epochs: must be > 0, got 0"),
    ("legacy_loop.py", ["--aggregator", "nope"], "unknown aggregator 'nope'"),
    ("lightning_module.py", ["--epochs", "1"], "--epochs must be at least 2"),
    ("mpps_multitask.py", ["--epochs", "5", "--frozen", "2"], "leaves 1 epochs between"),
    ("mpps_multitask.py", ["--seeds", "x"], "argument --seeds: expected an integer, got 'x'"),
    ("normal_positions.py", ["--lr", "-1"], "argument --lr: must be > 0, got -1"),
    ("normal_positions.py", ["--lr", "nan"], "argument --lr: expected a finite number"),
    ("conal_grouped_tasks.py", ["--groups", "4"], "need at least two groups"),
    ("conal_grouped_tasks.py", ["--seeds", "1,1"], "a seed is repeated"),
])
def test_bad_arguments_are_argparse_errors(tmp_path: Path, monkeypatch, capsys, script: str,
                                           args: list[str], message: str) -> None:
    """In this process (the scripts parse their arguments before any work, so this is quick)."""
    if script == "lightning_module.py":
        pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings():
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "error:" in captured.err and message in captured.err, \
        captured.err
    assert not captured.out.strip() and not files(tmp_path)


def test_common_helpers(tmp_path: Path, monkeypatch, capsys) -> None:
    """``examples/_common.py`` itself: the table lines up ragged cells, ``output_dir`` never reuses
    a folder, the validators refuse what they should."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import argparse

    import _common

    text = _common.table(["name", "x", "y"], [["a", 1.0, "wide cell here"], ["longer name", 12345.678, 3]])
    [rows] = tables(text)
    assert rows == [["name", "x", "y"], ["a", "1.0000", "wide cell here"],
                    ["longer name", "12345.6780", "3"]]
    with pytest.raises(ValueError, match="every row needs 3 cells"):
        _common.table(["a", "b", "c"], [[1, 2]])
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(out=None)
    first, second = _common.output_dir(args, "demo"), _common.output_dir(args, "demo")
    assert (first.name, second.name) == ("demo-out-1", "demo-out-2") and second.is_dir()
    assert f"writing files into {first}" in capsys.readouterr().out
    assert _common.output_dir(argparse.Namespace(out="given/deeper"), "demo") == Path("given/deeper")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="not a folder"):
        _common.output_dir(argparse.Namespace(out="a_file"), "demo")
    for check, bad in [(_common.positive_int, ["0", "-3", "1.5", "x"]),
                       (_common.nonnegative_int, ["-1", "x"]),
                       (_common.positive_float, ["0", "-1e-3", "inf", "nan", "x"]),
                       (_common.nonnegative_float, ["-0.1", "inf"]),
                       (_common.seed_list, ["1,,2", "a", "3,3"])]:
        for text in bad:
            with pytest.raises(argparse.ArgumentTypeError):
                check(text)
    assert (_common.positive_int("3"), _common.nonnegative_int("0"), _common.positive_float("1e-3"),
            _common.seed_list("0,2,1")) == (3, 0, 1e-3, [0, 2, 1])
    assert list(_common.progress(range(3), argparse.Namespace(quiet=True))) == [0, 1, 2]
