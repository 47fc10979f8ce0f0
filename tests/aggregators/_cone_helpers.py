"""Independent references shared by the projection aggregators' tests (UPGrad, DualProj):
cvxpy's primal projection onto the dual cone and TorchJD's aggregators."""

from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch

__all__ = ["cvxpy_project", "torchjd_reference"]


def cvxpy_project(J: np.ndarray, v: np.ndarray) -> np.ndarray:
    """argmin ||x - v||^2 s.t. J x >= 0, solved in the primal (scaled for conditioning)."""
    s = max(float(np.linalg.norm(J, axis=1).max()), 1e-300)
    J = J[np.linalg.norm(J, axis=1) > 0]  # 0 x >= 0 holds always; it only confuses the solver
    if J.shape[0] == 0:
        return v
    x = cp.Variable(J.shape[1])
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - v / s)), [(J / s) @ x >= 0])
    for opts in ({"solver": cp.CLARABEL, "tol_gap_abs": 1e-11, "tol_gap_rel": 1e-11,
                  "tol_feas": 1e-11},
                 {"solver": cp.CLARABEL},
                 # opposite rows leave the cone no interior: an active-set-polished ADMM copes
                 {"solver": cp.OSQP, "eps_abs": 1e-12, "eps_rel": 1e-12, "max_iter": 400000,
                  "polish": True}):
        try:
            with warnings.catch_warnings():  # "may be inaccurate": the status says it
                warnings.simplefilter("ignore")
                prob.solve(**opts)
        except cp.error.SolverError:
            continue
        if prob.status == "optimal":
            break
    assert prob.status == "optimal", prob.status
    return s * x.value


def torchjd_reference(name: str, J: torch.Tensor) -> torch.Tensor:
    """torchjd's aggregator ``name`` on J, solving the same dual problem (skips without it).

    Conventions: torchjd's default projector normalises G and adds 1e-4 to its diagonal; with
    both turned off it solves the same dual problem, so the directions agree to rounding.
    """
    torchjd = pytest.importorskip("torchjd")
    pytest.importorskip("qpsolvers")
    from torchjd._linalg import QuadprogProjector

    projector = QuadprogProjector(norm_eps=0.0, reg_eps=1e-12)
    return getattr(torchjd.aggregation, name)(projector=projector)(J)
