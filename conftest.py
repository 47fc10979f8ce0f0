"""Repository-level pytest configuration: docstring examples of the package run with the tests."""

import importlib.util

# The Triton kernel module imports triton at the top; where Triton is absent (CPU machines) its
# docstrings cannot be collected.  Its tests in tests/gpu skip with a reason instead.
collect_ignore = [] if importlib.util.find_spec("triton") else ["torch_mtlgrad/_kernels/_triton_fill.py"]
