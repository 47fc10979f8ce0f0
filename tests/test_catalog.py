"""The methods catalog (``torch_mtlgrad.catalog``): one record per registry name, its flags true
to the classes, the README's table equal to the registry's rendering, and the ``random`` flag
checked by running every method under two global seeds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings

from tests.strategies import common_direction_matrices
from torch_mtlgrad import catalog
from torch_mtlgrad.aggregators import Mean, _registry, aliases, available, scale_convention

README = Path(__file__).resolve().parents[1] / "README.md"
REGENERATE = "python -m torch_mtlgrad methods --write README.md"


def test_readme_table_is_the_registry_rendering() -> None:
    diff = catalog.check_file(README)
    assert not diff, (f"README.md's methods table differs from the registry's rendering; run "
                      f"`{REGENERATE}` to regenerate it:\n" + "\n".join(diff[:40]))


def test_one_record_per_registry_name_with_the_registry_facts() -> None:
    recs = catalog.records()
    assert [r.name for r in recs] == list(_registry._ENTRIES)
    names = set(available())
    table = aliases()
    for r in recs:
        assert r.paper and r.summary, r.name
        assert r.scale == scale_convention(r.name)
        assert r.tensionable == (r.name + "+tension" in names)
        assert set(r.aliases) == {a for a, n in table.items() if n == r.name}
        assert r.reads in catalog.READS
        cls = _registry._resolve(r.name)
        assert r.cls == f"{cls.__module__}.{cls.__qualname__}"
        agg = catalog._default_instance(r.name, cls)
        assert (r.stateful, r.random, r.reads) == (bool(agg.stateful), bool(agg.random), agg.reads)
    tension, rescale = catalog.suffix_records()
    assert tension.reads == "jacobian" and tension.scale == scale_convention("mean+tension")
    assert rescale.scale.startswith(scale_convention("mgda*T"))


def _runs(name: str, J: torch.Tensor, losses: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Two calls of ``name`` (default arguments) built after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    agg = catalog._default_instance(name, _registry._resolve(name))
    return [agg(J, losses).clone() for _ in range(2)]


def _callable_names(J: torch.Tensor, losses: torch.Tensor) -> Iterator[tuple[str, bool]]:
    """(name, random) of every method a plain ``agg(J, losses)`` call runs (a method that needs
    more, e.g. validation losses, raises and is left out)."""
    for r in catalog.records():
        try:
            _runs(r.name, J, losses, 0)
        except (TypeError, ValueError):
            continue
        yield r.name, r.random


@settings(max_examples=4, deadline=None)
@given(common_direction_matrices(min_tasks=2, max_tasks=4))
def test_methods_not_marked_random_do_not_depend_on_the_global_seed(J: torch.Tensor) -> None:
    losses = torch.linspace(0.5, 2.0, J.shape[0], dtype=J.dtype)
    checked = 0
    for name, random in _callable_names(J, losses):
        if random:
            continue
        for a, b in zip(_runs(name, J, losses, 0), _runs(name, J, losses, 1)):
            assert torch.equal(a, b), f"{name} is not marked random but depends on the seed"
        checked += 1
    assert checked >= 10


def test_methods_marked_random_draw_from_their_seed() -> None:
    # Rows in conflict (negative cosines) so that orders, signs and weights all matter, with a
    # common improving direction (e_0) so that every method has an answer.
    rng = np.random.default_rng(3)
    J = torch.tensor(rng.standard_normal((4, 6)), dtype=torch.float64)
    J[1] = -0.8 * J[0] + 0.3 * J[1]
    J[:, 0] = 0.6  # 3 of the 6 pairs conflict
    losses = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    random_names = [n for n, random in _callable_names(J, losses) if random]
    assert {"rlw", "pcgrad", "graddrop", "gradvac"} <= set(random_names)
    for name in random_names:
        runs = [_runs(name, J, losses, s) for s in range(4)]
        assert any(not torch.equal(runs[0][k], other[k]) for other in runs[1:] for k in range(2)), \
            f"{name} is marked random but four global seeds gave the same directions"


def test_render_filters_by_reads_and_refuses_an_unknown_value() -> None:
    for key, label in (("gramian", "G"), ("G", "G"), ("jacobian", "J"), ("losses", None)):
        rows = catalog.render_markdown(reads=key).splitlines()[2:]
        assert rows
        for row in rows:
            cell = row.split(" | ")[2]
            assert cell.startswith(label) if label else cell in ("nothing", "losses")
    text = catalog.render_text(reads="losses")
    assert "mean" in text and "mgda" not in text
    with pytest.raises(ValueError, match="reads must be one of losses, gramian, jacobian"):
        catalog.render_markdown(reads="hessian")


def test_a_cell_with_a_pipe_is_escaped() -> None:
    rec = catalog.records()[0]
    from dataclasses import replace

    row = catalog.render_markdown([replace(rec, summary="a | b")]).splitlines()[2]
    assert "a \\| b" in row and row.count(" | ") == len(catalog.MARKDOWN_COLUMNS) - 1


def test_replace_block_needs_both_markers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no methods-table block"):
        catalog.replace_block("no markers here\n", "table\n")
    f = tmp_path / "page.md"
    f.write_text(f"intro\n{catalog.BEGIN}\nstale\n{catalog.END}\noutro\n")
    assert catalog.check_file(f)
    assert catalog.update_file(f) is True
    assert not catalog.check_file(f) and catalog.update_file(f) is False
    text = f.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{catalog.END}\noutro\n")
    assert "| `mgda` |" in text and "stale" not in text


class _Documented(Mean):
    paper = "Doe, *A Test Method*, 2026"
    summary = "the mean under another name"


class _Undocumented(Mean):
    paper = ""


@pytest.fixture
def registered() -> Iterator[None]:
    yield
    for name in ("zz_documented", "zz_undocumented"):
        _registry._ENTRIES.pop(name, None)
        _registry._SCALES.pop(name, None)


@pytest.mark.usefixtures("registered")
def test_a_newly_registered_method_appears_and_an_undocumented_one_is_refused() -> None:
    _registry.register("zz_documented", __name__, "_Documented", scale="convex")
    rec = catalog.records()[-1]
    assert (rec.name, rec.paper, rec.reads, rec.scale) == ("zz_documented", _Documented.paper,
                                                          "losses", "convex")
    assert "| `zz_documented` |" in catalog.render_markdown()
    _registry.register("zz_undocumented", __name__, "_Undocumented", scale="convex")
    with pytest.raises(ValueError, match="_Undocumented .* has no 'paper'"):
        catalog.records()


def test_building_the_catalog_leaves_the_global_random_state_alone() -> None:
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    catalog.records()
    catalog.suffix_records()
    catalog.method_diagnostics("rlw")
    assert torch.equal(torch.random.get_rng_state(), state)
