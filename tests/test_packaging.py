"""The wheel and the sdist hold what a user needs, and the installed wheel trains.

The distributions are built from a copy of the checkout (so nothing is written into it) without
build isolation, with the ``build`` front end: the sdist first, then the wheel from the unpacked
sdist, which is how pip builds a wheel from a source download.  The checks:

* the wheel holds exactly the package's files (every subpackage, ``py.typed``) and its metadata
  with the license; no tests, benchmarks, examples or docs;
* the sdist holds exactly the package, README.md, LICENSE, pyproject.toml, setup.cfg,
  MANIFEST.in and the generated metadata; the test suite stays in the repository (its modules
  import the repository's helpers and conftest.py, so shipped alone they could not run);
* the wheel, installed with ``pip install --target``, imports from there (not from this checkout)
  in a fresh interpreter started outside the repository, and one ``MultiTaskOptimizer`` step
  with MGDA changes every parameter to finite values.
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "torch_mtlgrad"
# The subpackages the library is made of; every one must reach the wheel (the test also checks
# that each directory of the source package with an __init__.py does).
SUBPACKAGES = ["aggregators", "capture", "capture/_kernels", "conal", "mpps", "normal", "weightings"]
# Left out of the copy the distributions are built from: version control, build outputs, caches.
_NOT_COPIED = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", "*.py[cod]", ".hypothesis",
    ".pytest_cache", ".ruff_cache", ".venv", ".whl",
)


def _version() -> str:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg["metadata"]["version"]


def _package_files() -> set[str]:
    """Every file of the source package, as ``torch_mtlgrad/...`` paths (caches left out)."""
    out = set()
    for path in (ROOT / PACKAGE).rglob("*"):
        rel = path.relative_to(ROOT)
        if path.is_file() and "__pycache__" not in rel.parts and path.suffix not in {".pyc", ".pyo"}:
            out.add(rel.as_posix())
    return out


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    spec = importlib.util.find_spec("build")
    if spec is None or spec.origin is None:  # absent, or only a build/ output directory on the path
        pytest.fail("the 'build' package is missing: install the test extra, pip install -e '.[test]'")
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_COPIED)
    out = tmp / "dist"
    # No --sdist/--wheel: build makes the sdist, then the wheel from it.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)], cwd=tmp)
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return {"tmp": tmp, "wheel": wheels[0], "sdist": sdists[0]}


def test_wheel_holds_the_package_and_its_license_only(dists) -> None:
    dist_info = f"{PACKAGE}-{_version()}.dist-info"
    with zipfile.ZipFile(dists["wheel"]) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"{dist_info}/METADATA").decode()
        licenses = [n for n in names if n.startswith(f"{dist_info}/") and n.endswith("/LICENSE")]
        license_text = zf.read(licenses[0]) if licenses else b""

    assert {n.split("/")[0] for n in names} == {PACKAGE, dist_info}
    shipped = {n for n in names if n.startswith(f"{PACKAGE}/")}
    expected = _package_files()
    assert shipped == expected, (
        f"missing from the wheel: {sorted(expected - shipped)} (a non-.py file the package needs "
        f"goes in setup.cfg's [options.package_data]); not in the source: {sorted(shipped - expected)}"
    )
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / PACKAGE).rglob("__init__.py")}
    assert {f"{PACKAGE}/{s}" for s in SUBPACKAGES} <= packages
    for pkg in packages:
        assert f"{pkg}/__init__.py" in names, pkg
    assert f"{PACKAGE}/py.typed" in names

    assert licenses, f"no LICENSE in {dist_info}: {sorted(n for n in names if n.startswith(dist_info))}"
    assert license_text == (ROOT / "LICENSE").read_bytes()
    assert "License-File: LICENSE" in metadata.splitlines()
    assert {"License: MIT", "License-Expression: MIT"} & set(metadata.splitlines()), metadata[:800]


def test_sdist_holds_the_package_readme_license_and_build_files_only(dists) -> None:
    top = f"{PACKAGE}-{_version()}"
    with tarfile.open(dists["sdist"]) as tf:
        members = {m.name: m for m in tf.getmembers()}
        license_text = tf.extractfile(members[f"{top}/LICENSE"]).read()
    files = {name[len(top) + 1:] for name, m in members.items() if m.isfile()}
    assert all(name == top or name.startswith(f"{top}/") for name in members), sorted(members)

    assert {f.split("/")[0] for f in files} == {
        "LICENSE", "MANIFEST.in", "PKG-INFO", "README.md", "pyproject.toml", "setup.cfg",
        PACKAGE, f"{PACKAGE}.egg-info",
    }, sorted(files)
    shipped = {f for f in files if f.startswith(f"{PACKAGE}/")}
    expected = _package_files()
    assert shipped == expected, (sorted(expected - shipped), sorted(shipped - expected))
    assert license_text == (ROOT / "LICENSE").read_bytes()
    assert not [f for f in files if f.startswith(("tests/", "benchmarks/", "examples/", "docs/"))]


_STEP = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    import torch_mtlgrad
    from torch_mtlgrad import MultiTaskOptimizer

    site = Path(sys.argv[1]).resolve()
    here = Path(torch_mtlgrad.__file__).resolve()
    assert site in here.parents, f"torch_mtlgrad imported from {here}, not from {site}"

    torch.manual_seed(0)
    enc = torch.nn.Linear(4, 3)
    heads = [torch.nn.Linear(3, 1) for _ in range(2)]
    params = [*enc.parameters(), *(p for h in heads for p in h.parameters())]
    opt = MultiTaskOptimizer(torch.optim.SGD(params, lr=0.1), shared=enc, aggregator="mgda")
    x = torch.randn(16, 4)
    ys = [torch.randn(16, 1) for _ in heads]
    before = [p.detach().clone() for p in params]

    opt.zero_grad()
    z = enc(x)
    losses = [torch.nn.functional.mse_loss(h(z), y) for h, y in zip(heads, ys)]
    opt.backward(losses)
    opt.step()

    for i, (b, p) in enumerate(zip(before, params)):
        assert torch.isfinite(p).all(), f"parameter {i} is not finite"
        assert not torch.equal(b, p), f"parameter {i} did not change"
    outside = [m.__file__ for n, m in sys.modules.items()
               if n.startswith("torch_mtlgrad") and getattr(m, "__file__", None)
               and site not in Path(m.__file__).resolve().parents]
    assert not outside, outside
    print("ok", here)
    """
)


def test_installed_wheel_imports_from_the_install_and_takes_a_step(dists) -> None:
    site = dists["tmp"] / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
          "--disable-pip-version-check", "--target", str(site), str(dists["wheel"])])
    assert sorted(p.name for p in site.iterdir() if not p.name.startswith(".")) == [
        PACKAGE, f"{PACKAGE}-{_version()}.dist-info",
    ]
    work = dists["tmp"] / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = _run([sys.executable, "-c", _STEP, str(site)], cwd=work, env=env)
    assert proc.stdout.startswith("ok "), proc.stdout
