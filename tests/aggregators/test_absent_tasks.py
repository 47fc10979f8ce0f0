"""Absent tasks (``present=``) for every method of the registry.

The reference keeps the full state dict and, at each step, builds a fresh instance, loads the
state restricted to the present tasks (sliced here, from the state dict, by the rules each
method's docstring states), runs it on the present rows with a plain call, and scatters the new
state back.  The method under test must give the same direction and present weights (to 1e-12),
exactly 0 for the absent tasks' weights, and leave the absent tasks' state bit-identical.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from torch_mtlgrad.aggregators import Aggregator, WeightedAggregator, available, get
from torch_mtlgrad.aggregators._learned import LearnedVector
from torch_mtlgrad.aggregators._registry import needs_validation
from torch_mtlgrad.aggregators.dwa import DWA
from torch_mtlgrad.aggregators.famo import FAMO
from torch_mtlgrad.aggregators.gradnorm import GradNorm

from .._properties import assert_close
from ..strategies import presence_patterns

T, D, STEPS = 4, 6, 30
# Methods that read a validation batch (Auto-Lambda) are checked in their own files.
NAMES = [n for n in available() if not needs_validation(n)]
RANDOM = {"rlw", "pcgrad", "graddrop", "gradvac", "cosmos"}
NAN = float("nan")


def base_of(name: str) -> str:
    return name.split("+")[0]


CONSTANT = torch.tensor([0.5, 2.0, -1.0, 1.5], dtype=torch.float64)


def build(name: str, idx: Tensor | None = None) -> Aggregator:
    """The method as tested; with ``idx``, for the tasks ``idx`` only (its per-task settings
    restricted to them: the reference's fresh instance)."""
    base = base_of(name)
    kw: dict[str, Any] = {}
    if base == "constant":
        kw["weights"] = CONSTANT if idx is None else CONSTANT[idx]
    if base in RANDOM:
        kw["seed"] = 3
    if name.endswith("+tension"):
        kw["window"] = 3
    return get(name, **kw)


def data(seed: int, steps: int = STEPS) -> list[tuple[Tensor, Tensor]]:
    rng = np.random.default_rng(seed)
    return [(torch.tensor(rng.standard_normal((T, D))), torch.tensor(rng.uniform(0.1, 2.0, T)))
            for _ in range(steps)]


# --- The reference: state dicts sliced to the present tasks -----------------------------------

def _put(full: Tensor, sub: Tensor, axes: tuple[int, ...], idx: Tensor) -> Tensor:
    full = full.clone()
    if axes == (0,):
        full[idx] = sub.to(full)
    elif axes == (1,):
        full[:, idx] = sub.to(full)
    else:
        full[idx[:, None], idx[None, :]] = sub.to(full)
    return full


def _take(x: Tensor, axes: tuple[int, ...], idx: Tensor) -> Tensor:
    if axes == (0,):
        return x[idx].clone()
    if axes == (1,):
        return x[:, idx].clone()
    return x[idx][:, idx].clone()


def _lv_steps(lv: dict[str, Any], n: int) -> Tensor:
    if lv.get("steps") is not None:
        return lv["steps"].clone()
    st = lv["optimizer"]["state"].get(0)
    return torch.full((n,), 0.0 if st is None else float(st["step"]), dtype=torch.float64)


def lv_restrict(lv: dict[str, Any], idx: Tensor) -> dict[str, Any]:
    if lv.get("value") is None:
        return {"value": None, "optimizer": None}
    n = lv["value"].shape[0]
    value = lv["value"][idx].clone()
    opt = copy.deepcopy(lv["optimizer"])
    steps = _lv_steps(lv, n)[idx]
    st = opt["state"].get(0)
    out: dict[str, Any] = {"value": value, "optimizer": opt}
    if st is None or "exp_avg" not in st:
        opt["state"] = {}
        return out
    m, v = st["exp_avg"][idx].clone(), st["exp_avg_sq"][idx].clone()
    if bool((steps == steps[0]).all()):
        opt["state"] = {} if float(steps[0]) == 0 else {
            0: {"step": torch.tensor(float(steps[0])), "exp_avg": m, "exp_avg_sq": v}}
    else:
        opt["state"] = {0: {"step": torch.tensor(float(steps.max())), "exp_avg": m,
                            "exp_avg_sq": v}}
        out["steps"] = steps
    return out


def lv_scatter(full: dict[str, Any], sub: dict[str, Any], idx: Tensor,
               fill: float) -> dict[str, Any]:
    if sub.get("value") is None:
        return full
    if full.get("value") is None:
        value = torch.full((T,), fill, dtype=sub["value"].dtype)
        full = {"value": value, "optimizer": copy.deepcopy(sub["optimizer"])}
        full["optimizer"]["state"] = {}
    value = _put(full["value"], sub["value"], (0,), idx)
    steps = _lv_steps(full, T)
    steps[idx] = _lv_steps(sub, idx.numel())
    st_full = full["optimizer"]["state"].get(0)
    st_sub = sub["optimizer"]["state"].get(0)
    zeros = torch.zeros(T, dtype=value.dtype)
    m = zeros.clone() if st_full is None else st_full["exp_avg"].clone()
    v = zeros.clone() if st_full is None else st_full["exp_avg_sq"].clone()
    if st_sub is not None:
        m[idx], v[idx] = st_sub["exp_avg"], st_sub["exp_avg_sq"]
    opt = copy.deepcopy(sub["optimizer"])
    out: dict[str, Any] = {"value": value, "optimizer": opt}
    if bool((steps == steps[0]).all()):
        opt["state"] = {} if float(steps[0]) == 0 else {
            0: {"step": torch.tensor(float(steps[0])), "exp_avg": m, "exp_avg_sq": v}}
    else:
        opt["state"] = {0: {"step": torch.tensor(float(steps.max())), "exp_avg": m,
                            "exp_avg_sq": v}}
        out["steps"] = steps
    return out


def restrict(name: str, agg: Aggregator, state: dict[str, Any], idx: Tensor) -> dict[str, Any]:
    """The state a fresh instance on the present tasks ``idx`` starts from."""
    base = base_of(name)
    if name.endswith("+tension"):
        hist = state["history"]
        out = {"history": None if hist is None else hist[:, idx].clone(), "count": state["count"],
               "base": restrict(base, agg.base, state["base"], idx)}  # type: ignore[attr-defined]
        if hist is not None:
            tc = state.get("task_count", torch.full((T,), state["count"], dtype=torch.int64))
            out["task_count"] = tc[idx].clone()
        return out
    s = copy.deepcopy(state)
    if base == "gradvac" and s["phi_hat"] is not None:
        s["phi_hat"] = _take(s["phi_hat"], (0, 1), idx)
    elif base in ("moco", "modo") and s["lambda"] is not None:  # lambda on the simplex
        lam = s["lambda"][idx]
        mass = lam.sum()
        if base == "moco":
            s["y"] = s["y"][idx].clone()
        s["lambda"] = lam / mass if mass > 0 else torch.full_like(lam, 1 / idx.numel())
    elif base == "pcd" and s["sq_norm_ema"] is not None:
        s["sq_norm_ema"] = s["sq_norm_ema"][idx].clone()
        s["task_steps"] = s["task_steps"][idx].clone()
    elif base == "crmogm" and s["lambda"] is not None:
        s["lambda"] = s["lambda"][idx].clone()  # the default base (mgda) keeps no state
    elif base == "dbmtl" and s["m"] is not None:
        s["m"] = s["m"][idx].clone()
    elif base == "sdmgrad" and s["w"] is not None:
        s["w"] = s["w"][idx].clone()  # the call renormalises it to sum 1 itself
    elif base == "excessmtl" and s["alpha"] is not None:
        for key in ("sq_grad_sum", "baseline", "alpha"):  # alpha: renormalised by the call
            s[key] = s[key][idx].clone()
    elif base == "nashmtl":
        for key in ("alpha", "a"):
            if s[key] is not None:
                s[key] = s[key][idx].clone()
    elif base == "dwa":
        if s["history"] is not None:
            s["history"] = s["history"][:, idx].clone()
        assert s["running"] is None  # steps_per_epoch=1: every call closes its epoch
    elif base == "uw":
        s["log_var"] = lv_restrict(s["log_var"], idx)
    elif base in ("imtll", "imtl"):
        s["log_scale"] = lv_restrict(s["log_scale"], idx)
    elif base == "famo":
        s["logits"] = lv_restrict(s["logits"], idx)
        if s["prev_losses"] is not None:
            s["prev_losses"] = s["prev_losses"][idx].clone()
    elif base == "gradnorm":
        s["weights"] = lv_restrict(s["weights"], idx)
        if s["initial_losses"] is not None:
            s["initial_losses"] = s["initial_losses"][idx].clone()
    return s


def scatter(name: str, full: dict[str, Any], new: dict[str, Any], idx: Tensor) -> dict[str, Any]:
    """The full state after a step of the present tasks ``idx`` (``new``: their state after)."""
    base = base_of(name)
    if name.endswith("+tension"):
        hist = full["history"]
        hist = torch.zeros_like(new["history"][:, :1]).expand(-1, T) if hist is None else hist
        tc = full.get("task_count", torch.full((T,), full["count"] if full["history"] is not None
                                               else 0, dtype=torch.int64)).clone()
        tc[idx] = new.get("task_count", torch.full((idx.numel(),), new["count"],
                                                   dtype=torch.int64))
        out = {"history": _put(hist, new["history"], (1,), idx), "count": new["count"],
               "base": scatter(base, full["base"], new["base"], idx)}
        if not bool((tc == new["count"]).all()):
            out["task_count"] = tc
        return out
    s = copy.deepcopy(new)
    if base == "gradvac":
        prev = full["phi_hat"]
        prev = torch.zeros(T, T, dtype=new["phi_hat"].dtype) if prev is None else prev
        s["phi_hat"] = _put(prev, new["phi_hat"], (0, 1), idx)
    elif base in ("moco", "modo"):
        lam, mass = full["lambda"], None
        if lam is None:
            lam = torch.full((T,), 1.0 / T, dtype=new["lambda"].dtype)
            mass = torch.tensor(idx.numel() / T, dtype=lam.dtype)
        else:
            mass = lam[idx].sum()
        if base == "moco":
            y = full["y"] if full["y"] is not None else torch.zeros(T, D, dtype=new["y"].dtype)
            s["y"] = _put(y, new["y"], (0,), idx)
        s["lambda"] = _put(lam, new["lambda"] * mass, (0,), idx)
    elif base == "pcd":
        for key, dt in (("sq_norm_ema", torch.float64), ("task_steps", torch.int64)):
            prev = full[key] if full[key] is not None else torch.zeros(T, dtype=dt)
            s[key] = _put(prev, new[key], (0,), idx)
    elif base == "crmogm":
        prev = full["lambda"] if full["lambda"] is not None else torch.full(
            (T,), NAN, dtype=new["lambda"].dtype)
        s["lambda"] = _put(prev, new["lambda"], (0,), idx)
    elif base == "dbmtl":
        prev = full["m"] if full["m"] is not None else torch.zeros(T, D, dtype=new["m"].dtype)
        s["m"] = _put(prev, new["m"], (0,), idx)
    elif base == "sdmgrad":
        # The first call: the present tasks held their share of the initial w = 1/T.
        prev, share = full["w"], 1.0
        if prev is None:
            prev = torch.full((T,), 1.0 / T, dtype=new["w"].dtype)
            share = idx.numel() / T
        s["w"] = _put(prev, new["w"] * share, (0,), idx)
    elif base == "excessmtl":
        prev, share = full, 1.0
        if prev["alpha"] is None:  # the first call: the present tasks' share of 1/T
            dt = new["alpha"].dtype
            prev = {"sq_grad_sum": torch.zeros(T, D, dtype=dt),
                    "baseline": torch.zeros(T, dtype=dt),
                    "alpha": torch.full((T,), 1.0 / T, dtype=dt)}
            share = idx.numel() / T
        for key in ("sq_grad_sum", "baseline"):
            s[key] = _put(prev[key], new[key], (0,), idx)
        s["alpha"] = _put(prev["alpha"], new["alpha"] * share, (0,), idx)
    elif base == "nashmtl":
        for key, fill in (("alpha", NAN), ("a", 1.0)):
            prev = full[key] if full[key] is not None else torch.full((T,), fill,
                                                                    dtype=torch.float64)
            s[key] = _put(prev, new[key], (0,), idx)
    elif base == "dwa":
        prev = full["history"] if full["history"] is not None else torch.zeros(2, T,
                                                                             dtype=torch.float64)
        s["history"] = _put(prev, new["history"], (1,), idx)
    elif base == "uw":
        s["log_var"] = lv_scatter(full["log_var"], new["log_var"], idx, 0.0)
    elif base in ("imtll", "imtl"):
        s["log_scale"] = lv_scatter(full["log_scale"], new["log_scale"], idx, 0.0)
    elif base == "famo":
        s["logits"] = lv_scatter(full["logits"], new["logits"], idx, 0.0)
        prev = full["prev_losses"] if full["prev_losses"] is not None else torch.full(
            (T,), NAN, dtype=torch.float64)
        s["prev_losses"] = _put(prev, new["prev_losses"], (0,), idx)
    elif base == "gradnorm":
        s["weights"] = lv_scatter(full["weights"], new["weights"], idx, 1.0)
        prev = full["initial_losses"] if full["initial_losses"] is not None else torch.full(
            (T,), NAN, dtype=torch.float64)
        s["initial_losses"] = _put(prev, new["initial_losses"], (0,), idx)
    return s


# Per-task tensors of a state dict (by key) and their task axes: what must not move for an
# absent task.
TASK_AXES = {"phi_hat": (0, 1), "y": (0,), "m": (0,), "lambda": (0,), "alpha": (0,), "a": (0,),
             "history": (1,), "running": (0,), "value": (0,), "exp_avg": (0,),
             "exp_avg_sq": (0,), "steps": (0,), "prev_losses": (0,), "initial_losses": (0,),
             "task_count": (0,), "sq_norm_ema": (0,), "task_steps": (0,)}
TASK_AXES.update({"w": (0,)})  # sdmgrad
TASK_AXES.update({"sq_grad_sum": (0,), "baseline": (0,), "warmup_sum": (0,),
                  "warmup_count": (0,)})  # excessmtl


def task_slices(state: Any, idx: Tensor, prefix: str = "") -> dict[str, Tensor]:
    """Every per-task tensor of ``state`` sliced to ``idx`` (Adam's step counts and the
    tensioner's per-task counts materialised), keyed by path."""
    out: dict[str, Tensor] = {}
    if not isinstance(state, dict):
        return out
    if "value" in state and "optimizer" in state and state["value"] is not None:
        out[prefix + "/steps"] = _lv_steps(state, state["value"].shape[0])[idx]
    if "count" in state and "history" in state and state.get("history") is not None \
            and state["history"].shape[0] != 2:
        tc = state.get("task_count", torch.full((T,), state["count"], dtype=torch.int64))
        out[prefix + "/task_count"] = tc[idx]
    for k, v in state.items():
        key = f"{prefix}/{k}"
        if isinstance(v, Tensor) and str(k) in TASK_AXES and k not in ("steps", "task_count"):
            out[key] = _take(v, TASK_AXES[str(k)], idx)
        elif isinstance(v, dict):
            out.update(task_slices(v, idx, key))
    return out


def assert_bits_equal(a: dict[str, Tensor], b: dict[str, Tensor], msg: Any) -> None:
    for k in a.keys() & b.keys():
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=f"{msg} {k}")


# --- Every method against the reference -----------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_present_matches_reference(name: str) -> None:
    agg = build(name)
    ref_state = build(name).state_dict()
    masks = presence_patterns(seed=sum(map(ord, name)), steps=STEPS, num_tasks=T)
    for step, ((J, L), mask) in enumerate(zip(data(1), masks)):
        idx = mask.nonzero().flatten()
        absent = (~mask).nonzero().flatten()
        before = agg.state_dict()
        out = agg.aggregate(J[mask], L[mask], present=mask)
        ref = build(name, idx)
        ref.load_state_dict(restrict(name, ref, ref_state, idx))
        exp = ref.aggregate(J[mask], L[mask])
        ref_state = scatter(name, ref_state, ref.state_dict(), idx)
        where = (name, step, mask.tolist())
        assert out.direction is not None and exp.direction is not None
        assert out.direction.shape == (D,)
        assert_close(out.direction, exp.direction, atol=1e-12, rtol=1e-12, msg=where)
        if exp.weights is None:
            assert out.weights is None, where
        else:
            assert out.weights is not None and out.weights.shape == (T,), where
            assert bool((out.weights[absent] == 0).all()), where
            assert_close(out.weights[idx], exp.weights, atol=1e-12, rtol=1e-12, msg=where)
            assert out.weights is agg.weights
        for k, v in out.diagnostics.items():  # per-task diagnostics: over the present tasks
            if k in exp.diagnostics and isinstance(v, Tensor):
                assert v.shape == exp.diagnostics[k].shape, (where, k)
        if absent.numel():
            assert_bits_equal(task_slices(before, absent), task_slices(agg.state_dict(), absent),
                              where)
        # The state stays the reference's (to rounding), present tasks included.
        now, expect = task_slices(agg.state_dict(), idx), task_slices(ref_state, idx)
        for k in now.keys() & expect.keys():
            torch.testing.assert_close(now[k].double(), expect[k].double(), atol=1e-12,
                                       rtol=1e-12, equal_nan=True, msg=f"{where} {k}")


@pytest.mark.parametrize("name", NAMES)
def test_plain_call_is_unchanged(name: str) -> None:
    """present=None and present all True are the plain call, bit for bit, state included."""
    a, b, c = build(name), build(name), build(name)
    for J, L in data(2, steps=12):
        x = a.aggregate(J, L)
        y = b.aggregate(J, L, present=None)
        z = c.aggregate(J, L, present=[True] * T)
        assert torch.equal(x.direction, y.direction) and torch.equal(x.direction, z.direction)
        if x.weights is not None:
            assert torch.equal(x.weights, y.weights) and torch.equal(x.weights, z.weights)
    assert_bits_equal(task_slices(a.state_dict(), torch.arange(T)),
                      task_slices(c.state_dict(), torch.arange(T)), name)
    assert a.state_dict().keys() == c.state_dict().keys()


@pytest.mark.parametrize("name", NAMES)
def test_plain_calls_after_absent_ones_match_reference(name: str) -> None:
    """A plain call after calls with absent tasks (some never present yet) is the reference's
    step on every task."""
    agg, ref_state = build(name), build(name).state_dict()
    masks = [torch.tensor([True, False, True, False]), torch.tensor([True, True, True, True]),
             torch.tensor([False, True, False, True]), torch.tensor([True] * T)] * 2
    for step, ((J, L), mask) in enumerate(zip(data(3, steps=8), masks)):
        idx = mask.nonzero().flatten()
        out = agg.aggregate(J[mask], L[mask], present=None if mask.all() else mask)
        ref = build(name, idx)
        ref.load_state_dict(restrict(name, ref, ref_state, idx))
        exp = ref.aggregate(J[mask], L[mask])
        ref_state = scatter(name, ref_state, ref.state_dict(), idx)
        assert_close(out.direction, exp.direction, atol=1e-12, rtol=1e-12, msg=(name, step))


@pytest.mark.parametrize("name", NAMES)
def test_bad_present_is_a_value_error_and_changes_nothing(name: str) -> None:
    agg = build(name)
    J, L = data(4, steps=1)[0]
    agg.aggregate(J, L)
    before = copy.deepcopy(agg.state_dict())
    J2, L2 = J[:2], L[:2]
    cases = [
        ([1, 0, 1, 0], "not a bool"),
        (torch.tensor([1.0, 0.0, 1.0, 0.0]), "bool tensor"),
        ("TFTF", "None or a 1-D bool"),
        (torch.ones(2, 2, dtype=torch.bool), "1-D"),
        ([False] * T, "no True entry"),
        ([True, True, True, False], "J has 2 rows but present marks 3"),
        ([], "empty"),
    ]
    if agg._known_num_tasks() is not None:  # the state or per-task settings fix T
        cases.append(([True, False, True], "present has 3 entries but this aggregator has 4"))
    else:  # nothing fixes T: any length is valid
        assert agg.aggregate(J2, L2, present=[True, False, True]).direction.shape == (D,)
        agg = build(name)
        agg.aggregate(J, L)
    for present, msg in cases:
        with pytest.raises(ValueError, match=msg):
            agg.aggregate(J2, L2, present=present)
    with pytest.raises(ValueError, match=r"losses must have shape \[2\]"):
        agg.aggregate(J2, L, present=[True, False, True, False])
    assert_bits_equal(task_slices(before, torch.arange(T)),
                      task_slices(agg.state_dict(), torch.arange(T)), name)
    if agg.from_gramian:
        with pytest.raises(ValueError, match="G has 2 rows but present marks 3"):
            agg.aggregate_gramian(J2 @ J2.T, L2, present=[True, True, True, False])


@pytest.mark.parametrize("name", NAMES)
def test_aggregate_gramian_with_present(name: str) -> None:
    a, b = build(name), build(name)
    if not a.from_gramian:
        pytest.skip("reads J")
    for (J, L), mask in zip(data(5, steps=6), presence_patterns(5, 6, T)):
        x = a.aggregate(J[mask], L[mask], present=mask)
        Jp = J[mask]
        y = b.aggregate_gramian(Jp @ Jp.T, L[mask], present=mask)
        assert y.direction is None and y.weights.shape == (T,)
        assert bool((y.weights[~mask] == 0).all())
        assert_close(y.weights, x.weights, atol=1e-9, rtol=1e-9, msg=name)


READS = {"mean": "losses", "sum": "losses", "constant": "losses", "rlw": "losses",
         "dwa": "losses", "uw": "losses", "famo": "losses", "moco": "jacobian", "dbmtl": "jacobian",
         "graddrop": "jacobian", "trimmedmean": "jacobian", "imtll": "losses",
         "stch": "losses", "gls": "losses", "pbi": "losses", "cosmos": "losses"}
READS["excessmtl"] = "jacobian"


@pytest.mark.parametrize("name", NAMES)
def test_reads_and_aggregate_losses(name: str) -> None:
    agg = build(name)
    expected = "jacobian" if name.endswith("+tension") else READS.get(name, "gramian")
    assert agg.reads == expected
    if expected != "losses":
        if isinstance(agg, WeightedAggregator):
            with pytest.raises(ValueError, match="not only the losses"):
                agg.aggregate_losses(torch.ones(T), num_tasks=T)
        else:  # only a weighting has weights without a direction
            assert not hasattr(agg, "aggregate_losses")
        return
    twin = build(name)
    for (J, L), mask in zip(data(6, steps=10), presence_patterns(6, 10, T)):
        x = twin.aggregate(J[mask], L[mask], present=mask)
        y = agg.aggregate_losses(L[mask], num_tasks=T, dtype=torch.float64, present=mask)
        assert y.direction is None
        assert torch.equal(y.weights, x.weights), name
    if agg._known_num_tasks() is not None:
        with pytest.raises(ValueError, match="num_tasks=3 but this aggregator has 4 tasks"):
            agg.aggregate_losses(L[:3], num_tasks=3)
    with pytest.raises(ValueError, match="present has 3 entries"):
        agg.aggregate_losses(L[:2], num_tasks=T, present=[True, True, False])
    with pytest.raises(ValueError, match="losses has 3 values but present marks 2"):
        agg.aggregate_losses(L[:3], num_tasks=T, present=[True, True, False, False])
    # The dtype rule and the device default.
    assert get("mean").aggregate_losses(num_tasks=2, dtype=torch.float16).weights.dtype == \
        torch.float32


# Methods that cannot take a loss of 0 (a log or a division by the loss), at which call.
ZERO_LOSS_ERRORS = {name for name in NAMES if name.endswith("+tension")} | {"gradnorm", "gls"}


@pytest.mark.parametrize("name", NAMES)
def test_zero_losses(name: str) -> None:
    J, L = data(7, steps=1)[0]
    L0 = L.clone()
    L0[1] = 0.0
    mask = torch.tensor([True, False, True, True])
    Lp = L.clone()[mask]
    Lp[1] = 0.0  # task 2
    for losses, present, task in ((L0, None, 1), (Lp, mask, 2)):
        agg = build(name)
        Jp = J if present is None else J[mask]
        if name in ZERO_LOSS_ERRORS:
            with pytest.raises(ValueError, match=rf"task {task} has .*loss 0\.0.*None"):
                agg.aggregate(Jp, losses, present=present)
            continue
        for _ in range(5 if name != "nashmtl" else 2):
            out = agg.aggregate(Jp, losses, present=present)
            assert bool(torch.isfinite(out.direction).all()), name
    # GradNorm: a zero loss after the first call is fine, every loss at 0 too (r = 1).
    gn = GradNorm()
    gn(J, L)
    assert bool(torch.isfinite(gn(J, L0)).all()) and bool(torch.isfinite(gn(J, 0 * L)).all())
    # Tensioner without its loss term: zero losses are fine.
    tz = get("mean+tension", loss_term=False, window=1)
    for _ in range(3):
        assert bool(torch.isfinite(tz(J, L0)).all())
    # FAMO with eps=0: log(0) is an error naming the task.
    with pytest.raises(ValueError, match=r"task 2 has loss 0\.0, equal to its lower bound.*None"):
        FAMO(eps=0.0).aggregate(J[mask], Lp, present=mask)


# --- Method-specific rules ------------------------------------------------------------------

def test_learned_vector_counts_adam_steps_per_task() -> None:
    """Adam on a subset: absent entries and moments do not move; each entry's bias correction
    uses its own step count (checked against Adam written out)."""
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    lv = LearnedVector("adam", lr)
    lv.init(torch.zeros(3, dtype=torch.float64))
    x, m, v, n = (torch.zeros(3, dtype=torch.float64) for _ in range(4))
    rng = np.random.default_rng(0)
    for k in range(12):
        mask = torch.from_numpy(rng.random(3) < 0.6)
        if not mask.any():
            continue
        g = torch.tensor(rng.standard_normal(3))
        idx = mask.nonzero().flatten()
        if bool(mask.all()):
            lv.step(g)
        else:
            sub = lv.restrict(idx)
            sub.step(g[idx])
            lv.scatter(sub, idx, 3)
        for i in idx.tolist():
            n[i] += 1
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            mh, vh = m[i] / (1 - b1 ** n[i]), v[i] / (1 - b2 ** n[i])
            x[i] -= lr * mh / (math.sqrt(vh) + eps)
        assert_close(lv.get(), x, atol=1e-12, msg=k)
    a = LearnedVector("adam", lr)
    a.load_state_dict(lv.state_dict(), "x")
    assert torch.equal(a.get(), lv.get())


def test_gradnorm_initial_loss_is_the_first_present_one() -> None:
    J, L = data(8, steps=1)[0]
    agg = GradNorm(lr=0.1, optimizer="sgd")
    m = torch.tensor([True, True, False, True])
    agg.aggregate(J[m], L[m], present=m)
    L0 = agg.initial_losses
    assert L0 is not None and math.isnan(float(L0[2])) and torch.equal(L0[m], L[m])
    with pytest.raises(ValueError, match="task 2 has initial loss 0.0"):
        agg.aggregate(J, torch.tensor([1.0, 1.0, 0.0, 1.0]))
    agg.aggregate(J, 2 * L)
    assert float(agg.initial_losses[2]) == float(2 * L[2])
    assert float(agg.task_weights.sum()) == pytest.approx(T)


def test_dwa_epochs_average_each_task_over_its_present_calls() -> None:
    agg = DWA(steps_per_epoch=3)
    J = torch.eye(3, dtype=torch.float64)
    m01, m12 = torch.tensor([True, True, False]), torch.tensor([False, True, True])
    agg.aggregate(J[:2], torch.tensor([1.0, 2.0], dtype=torch.float64), present=m01)
    agg.aggregate(J[:2], torch.tensor([3.0, 4.0], dtype=torch.float64), present=m01)
    agg.aggregate(J[:2], torch.tensor([5.0, 6.0], dtype=torch.float64), present=m12)
    # epoch 1 closed: task 0 averages its 2 calls, task 1 its 3, task 2 its 1.
    assert_close(agg.history[1], torch.tensor([2.0, 11 / 3, 6.0], dtype=torch.float64),
                 rtol=1e-15)
    for _ in range(3):  # epoch 2: task 2 absent throughout keeps its history
        agg.aggregate(J[:2], torch.tensor([1.0, 1.0], dtype=torch.float64), present=m01)
    assert_close(agg.history, torch.tensor([[2.0, 11 / 3, 0.0], [1.0, 1.0, 6.0]],
                                           dtype=torch.float64), rtol=1e-15)
    out = agg.aggregate(J, torch.ones(3, dtype=torch.float64))
    ratio = out.diagnostics["loss_ratio"]  # task 2 has one epoch average only: ratio 1
    assert_close(ratio, torch.tensor([0.5, 3 / 11, 1.0], dtype=torch.float64), rtol=1e-15)
    b = DWA(steps_per_epoch=3)
    b.load_state_dict(agg.state_dict())
    assert b.state_dict().keys() == agg.state_dict().keys()


def test_tensioner_task_first_present_late_pulls_only_once_its_window_is_full() -> None:
    agg = get("central+tension", window=2, alpha=0.5)
    m = torch.tensor([True, True, True, False])
    Js = data(9, steps=8)
    for J, L in Js[:4]:
        out = agg.aggregate(J[m], L[m], present=m)
    assert float(out.diagnostics["tensioned"]) == 1.0
    for k, (J, L) in enumerate(Js[4:6]):  # task 3 present: windows of 1, then 2 entries
        out = agg.aggregate(J, L)
        assert float(out.diagnostics["c"][3]) == 0.0 and math.isnan(float(out.diagnostics[
            "delta"][3])), k
        assert bool((out.diagnostics["c"][:3] > 0).all())
    out = agg.aggregate(*Js[6])
    assert float(out.diagnostics["c"][3]) > 0  # its third present step
    assert agg.state_dict()["count"] == 7


def test_famo_update_takes_present() -> None:
    J, L = data(10, steps=1)[0]
    agg = FAMO()
    m = torch.tensor([True, False, True, True])
    agg.aggregate(J[m], L[m], present=m)
    agg.update(L[m] * 0.5, present=m)
    assert bool(torch.isnan(agg.prev_losses).all())  # task 1 never seen; the rest consumed
    with pytest.raises(RuntimeError, match="first"):
        agg.update(L[m], present=m)
    logits = agg.logits.clone()
    out = agg.aggregate(J, L)  # no pair of losses for any task: no logit update
    assert torch.equal(agg.logits, logits) and bool(torch.isnan(out.diagnostics["delta"]).all())


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_mid_run_with_absent_tasks(name: str) -> None:
    """A state saved while some task was never present resumes bit for bit."""
    a = build(name)
    masks = presence_patterns(11, 10, T, first_absent=3)
    masks[1][3] = False
    steps = list(zip(data(11, steps=10), masks))
    for (J, L), m in steps[:2]:
        a.aggregate(J[m], L[m], present=m)
    b = build(name)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for (J, L), m in steps[2:]:
        x = a.aggregate(J[m], L[m], present=m)
        y = b.aggregate(J[m], L[m], present=m)
        assert torch.equal(x.direction, y.direction), name
