"""``python -m torch_mtlgrad``: the methods table (text, Markdown, filtered by what the methods
read, written into and checked against a file), ``run EXAMPLE`` (arguments passed through, the
example's own folder importable, unknown names and a missing folder answered with the list or
where the examples are), and ``--help`` on every command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from torch_mtlgrad import catalog
from torch_mtlgrad.__main__ import (
    IN_REPOSITORY,
    NOT_INSTALLED,
    REPOSITORY_EXAMPLES,
    examples,
    main,
)
from torch_mtlgrad.aggregators import _registry

ROOT = Path(__file__).resolve().parents[1]


def test_the_default_command_prints_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0] for line in out.splitlines()[1:]}
    assert set(_registry._ENTRIES) | {"<name>+tension", "<name>*T"} == rows
    assert main(["methods"]) == 0 and capsys.readouterr().out == out


@pytest.mark.parametrize("reads", ["losses", "gramian", "J"])
def test_markdown_filtered_by_reads(reads: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "--markdown", "--reads", reads]) == 0
    assert capsys.readouterr().out == catalog.render_markdown(reads=reads)
    assert main(["--reads", reads]) == 0  # options without a command go to `methods`
    assert capsys.readouterr().out == catalog.render_text(reads=reads)


def test_an_unknown_reads_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["methods", "--reads", "hessian"])
    assert e.value.code == 2
    assert "reads must be one of losses, gramian, jacobian" in capsys.readouterr().err


def test_write_then_check_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"# Methods\n{catalog.BEGIN}\nold\n{catalog.END}\n")
    assert main(["methods", "--check", str(page)]) == 1
    assert "--write" in capsys.readouterr().err
    assert main(["methods", "--write", str(page)]) == 0
    assert "regenerated" in capsys.readouterr().out
    assert main(["methods", "--check", str(page)]) == 0
    assert page.read_text() == catalog.replace_block(page.read_text(), catalog.render_markdown())


@pytest.mark.parametrize("argv", [["--help"], ["methods", "--help"], ["run", "--help"]])
def test_help_on_every_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m torch_mtlgrad")
    assert {"--help": "{methods,run}", "methods": "--reads", "run": "EXAMPLE"}[argv[0]] in out


def _example_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "examples"
    folder.mkdir()
    (folder / "_helper.py").write_text("VALUE = 'from the helper'\n")
    (folder / "echo.py").write_text(
        '"""Echo: writes its arguments and a helper\'s value."""\n'
        "import sys\nfrom pathlib import Path\nfrom _helper import VALUE\n"
        "Path(sys.argv[1]).write_text(' '.join([VALUE, *sys.argv[2:]]))\n"
        "sys.exit(3 if '--fail' in sys.argv else 0)\n")
    return folder


def test_run_passes_the_arguments_and_the_exit_status(tmp_path: Path) -> None:
    folder = _example_folder(tmp_path)
    target = tmp_path / "out.txt"
    assert main(["run", "echo", str(target), "--epochs", "2", "-h"], examples_folder=folder) == 0
    assert target.read_text() == "from the helper --epochs 2 -h"
    assert main(["run", "echo.py", str(target), "--fail"], examples_folder=folder) == 3


def test_run_lists_the_examples_for_no_or_an_unknown_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _example_folder(tmp_path)
    assert main(["run"], examples_folder=folder) == 0
    out = capsys.readouterr().out
    assert "echo  Echo: writes its arguments" in out and "_helper" not in out
    assert main(["run", "ecoh"], examples_folder=folder) == 2
    err = capsys.readouterr().err
    assert "no example 'ecoh'" in err and "echo" in err


def test_run_without_the_examples_says_where_they_are(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["run", "quickstart"], examples_folder=tmp_path / "absent") == 2
    assert NOT_INSTALLED in capsys.readouterr().err
    import torch_mtlgrad.__main__ as cli

    monkeypatch.setattr(cli, "IN_REPOSITORY", False)  # an installed copy, outside a checkout
    assert main(["run", "quickstart"]) == 2
    assert NOT_INSTALLED in capsys.readouterr().err


def test_the_repository_examples_are_found() -> None:
    assert IN_REPOSITORY
    found = examples(REPOSITORY_EXAMPLES)
    assert "quickstart" in found and not any(n.startswith("_") for n in found)
    assert all(found.values()), "every example starts with a docstring"


def test_the_module_entry_point_runs_an_example_help() -> None:
    out = subprocess.run([sys.executable, "-m", "torch_mtlgrad", "run", "quickstart", "--help"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.startswith("usage: quickstart.py")
