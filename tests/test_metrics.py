"""Delta_m against a direct computation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_mtlgrad.metrics import delta_m


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 100), st.floats(0.01, 100), st.booleans()), min_size=1,
                max_size=8))
def test_delta_m_matches_definition(rows) -> None:
    m, b, up = zip(*rows)
    ref = 100 * sum((mi - bi) / bi * (1 if u else -1) for mi, bi, u in rows) / len(rows)
    assert delta_m(m, b, up) == pytest.approx(ref, rel=1e-9, abs=1e-9)
    assert delta_m(b, b, up) == 0.0


def test_delta_m_errors() -> None:
    with pytest.raises(ValueError, match="equal length"):
        delta_m([1.0], [1.0, 2.0], [True])
    with pytest.raises(ValueError, match="metric 1 is 0"):
        delta_m([1.0, 1.0], [1.0, 0.0], [True, True])
