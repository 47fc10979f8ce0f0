"""Repository-level pytest configuration: docstring examples of the package run with the tests."""

import importlib.util

# The Triton kernel module imports triton at the top; where Triton is absent (CPU machines) its
# docstrings cannot be collected.  Its tests in tests/gpu skip with a reason instead.
collect_ignore = [] if importlib.util.find_spec("triton") else ["torch_mtlgrad/capture/_kernels/_triton_fill.py"]

# Hypothesis: the default profile is derandomized, so every run of the README's test command (CI
# included) checks the same generated examples and a failure reproduces exactly.  To explore new
# examples locally: HYPOTHESIS_PROFILE=explore python -m pytest -q  (random, 5x the examples).
import os  # noqa: E402

from hypothesis import settings  # noqa: E402

settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
