"""The package's own exception types: a leaf module, so that the aggregators (math only) and the
step's checks raise the same class without importing each other."""

from __future__ import annotations

__all__ = ["NonFiniteError"]


class NonFiniteError(FloatingPointError, ValueError):
    """A NaN/Inf loss or task gradient under ``nonfinite="raise"``, or a non-finite ``J``, ``G``
    or loss given to an aggregator called on its own (the message names the task)."""
