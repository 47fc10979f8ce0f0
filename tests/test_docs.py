"""The documentation site: it builds offline with every warning an error (the command of
``docs/conf.py``), its generated pages hold every registered method, and the diagnostics page
documents every key a step writes into ``opt.diagnostics``."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from torch_mtlgrad import MultiTaskOptimizer, catalog
from torch_mtlgrad.aggregators import _registry

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
HAVE_SPHINX = all(importlib.util.find_spec(m) is not None for m in ("sphinx", "myst_parser"))


def _step_keys(aggregator: str, *, absent: bool = False, conal: bool = False,
               diagnostics: bool | str = True) -> set[str]:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))
    opt = MultiTaskOptimizer(torch.optim.SGD([*enc.parameters(), *heads.parameters()], lr=0.1),
                             shared=enc, aggregator=aggregator, diagnostics=diagnostics,
                             conflict_noticing=[enc[0], enc[2]] if conal else None)
    x, ys = torch.randn(16, 4), [torch.randn(16, 1) for _ in range(3)]
    opt.zero_grad()
    z = enc(x)
    losses = [nn.functional.mse_loss(h(z), y) for h, y in zip(heads, ys)]
    opt.backward([losses[0], None, losses[2]] if absent else losses)
    opt.step()
    return set(opt.diagnostics)


def test_the_diagnostics_page_documents_every_key_a_step_writes() -> None:
    page = (DOCS / "diagnostics.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([^`]+)` \|", page, flags=re.MULTILINE))
    assert documented == set(catalog.OPTIMIZER_DIAGNOSTICS) | {"<PluginClass>.<name>"}
    runs = [("mgda", {}), ("mgda", {"absent": True}), ("central+tension", {"conal": True}),
            ("mean", {}), ("mean", {"absent": True, "diagnostics": "full"}), ("upgrad", {})]
    for name, kwargs in runs:
        own = set(catalog.method_diagnostics(name) or {})
        for key in _step_keys(name, **kwargs) - own:
            if key.startswith("ConflictNoticing."):
                assert f"`{key}`" in page, key
            else:
                assert key in catalog.OPTIMIZER_DIAGNOSTICS, f"{key!r} ({name}) is not documented"


def test_every_docs_page_is_in_a_toctree_of_the_index() -> None:
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^([\w-]+)$", index, flags=re.MULTILINE))
    pages = {p.stem for p in DOCS.glob("*.md")} - {"index"}
    assert pages <= listed, f"add {sorted(pages - listed)} to a toctree in docs/index.md"


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SPHINX, reason="needs sphinx and myst-parser (pip install -e '.[docs]')")
def test_the_site_builds_offline_with_warnings_as_errors(tmp_path: Path) -> None:
    out = tmp_path / "html"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "no_proxy": "*", "http_proxy": "http://0.0.0.0:9",
           "https_proxy": "http://0.0.0.0:9"}  # a fetch would fail, and -W makes it an error
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           str(DOCS), str(out), "-d", str(tmp_path / "doctrees")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-6000:] + proc.stdout[-2000:]
    methods = (out / "methods.html").read_text(encoding="utf-8")
    for name in _registry._ENTRIES:
        assert f"<code class=\"docutils literal notranslate\"><span class=\"pre\">{name}</span>" \
            in methods, name
    api = (out / "api.html").read_text(encoding="utf-8")
    for rec in catalog.records():
        assert f'id="torch_mtlgrad.aggregators.{rec.cls.rsplit(".", 1)[1]}"' in api \
            or f'id="{rec.cls}"' in api, rec.cls
    diagnostics = (out / "diagnostics.html").read_text(encoding="utf-8")
    assert "generated:" not in diagnostics and "simplex_weights" in diagnostics
    assert "usage: python -m torch_mtlgrad run" in (out / "cli.html").read_text(encoding="utf-8")
