"""One registry of aggregators by short name, used by ``get`` and by ``MultiTaskOptimizer``.

Entries are ``"module:Class"`` paths, imported on first use so that building one method never
imports the others.  Beside the entries, five small tables, one each:

* ``_ALIASES``: other spellings of a name (``"nash-mtl"`` for ``"nashmtl"``, ``"min-norm"`` for
  ``"mgda"``, ...); :func:`aliases` returns a copy, :func:`available` lists canonical names only.
* ``_SCALES``: each method's scale convention (:func:`scale_convention`).
* ``_EXAMPLES``: for a method with required arguments, an example call (for the error message).
* ``_NEEDS_VALIDATION``: methods that read a validation batch at every step
  (:func:`needs_validation`).
* ``_NOT_AGGREGATORS``: names of methods that are a capture mode rather than an aggregator
  (``"mgda-ub"``): :func:`get` raises and says what to write instead.

Name forms: ``"<name>"``, ``"<name>+tension"`` (any gradient aggregator wrapped in
:class:`~torch_mtlgrad.aggregators.Tensioned`) and ``"<name>*T"`` or ``"<name>+tension*T"``
(wrapped last in :class:`~torch_mtlgrad.aggregators.Rescaled`: direction times the number of
tasks).  The suffixes come in that order, ``+tension`` then ``*T``; names are case- and
whitespace-insensitive.

Scale conventions (with the default arguments; each checked numerically on random ``J`` by the
test suite):

* ``"sum"``: the direction has the scale of the sum of the task gradients: on every call, ``T``
  equal rows ``g`` give ``d = T g`` exactly, the step of ``sum(losses).backward()``.  ``sum``,
  ``pcgrad``, ``graddrop``, ``gradvac`` (equal rows never conflict: left as they are), ``alignedmtl``
  (the authors' sum of the aligned gradients), ``dwa`` and ``gradnorm`` (weights summing to
  ``T``), ``constant`` (the gradient of ``sum_t w_t L_t`` for the weights as given: the sum for
  weights 1), ``config`` (length the sum of the projections onto its unit direction: ``T ||g||``
  on equal rows).
* ``"convex"``: ``d = w^T J`` with weights summing to 1 on every call: a convex combination of
  the rows (so ``||d|| <= max_t ||g_t||``) wherever the weights are non-negative, a mean-like
  scale, ``g`` on equal rows (``1/T`` of the sum's).  ``mean``, ``mgda``, ``central``, ``imtlg``
  (whose weights may be negative for ``T >= 3``, as the paper defines them), ``rlw``, ``famo``,
  ``krum`` (one-hot weights, or ``1/m`` on the ``m`` rows Multi-Krum selects),
  ``excessmtl`` (exponentiated weights on the simplex),
  ``sdmgrad`` (weights ``(w + lambda / T) / (1 + lambda)``, ``w`` on the simplex),
  ``crmogm`` (a moving average of the weights of its default base, ``mgda``),
  ``modo`` (its ``lambda`` on the simplex), ``stch`` (with its default preference
  ``lambda = 1``: the weights are a softmax).
* ``"unnormalised"``: neither.  ``dbmtl`` (log-loss gradients rescaled to the largest norm and
  summed: about ``T (1 - beta) g / min_t L_t`` on equal rows), ``cagrad`` (weights summing to ``1 + c ||g_0|| / ||g_w||``:
  ``(1 + c) g`` on equal rows), ``upgrad`` and ``dualproj`` (the mean, plus non-negative
  multiples of the rows from the projection: weights summing to at least 1, ``g`` on equal
  rows), ``nashmtl`` (weights about ``1 / ||g||``: the direction does not grow with the
  gradients; capped by ``max_norm``), ``moco`` (simplex weights over its tracked gradient
  estimates, not the current rows: on equal rows ``g`` it starts at ``beta g`` and approaches
  ``g`` as the tracking converges), ``uw`` (weights ``exp(-s)``: 1 at the start, learned and
  unconstrained after), ``imtll`` (weights ``e^s``: 1 at the start, learned after), ``imtl``
  (IMTL-G's weights of the rows scaled by ``e^s``: ``g`` at the start, then its length set by the
  learned scales), ``gls`` (weights ``F / (T L_t)``, summing to the ratio of the losses'
  geometric and harmonic means, at least 1), ``pbi`` (weights ``r_hat`` plus the penalty's:
  ``sqrt(T)`` in sum for the default ray), ``cosmos`` (the preference minus the cosine
  penalty's gradient: summing to 1 only without the penalty),
  ``autolambda`` (weights ``lambda``: ``init = 0.1`` at the start,
  meta-learned and unconstrained after), ``trimmedmean`` (coordinate-wise: each coordinate of ``d`` between
  its column's smallest and largest value, ``g`` on equal rows, but no combination of the
  rows), ``pcd`` (``||d|| = ||g_1||``, the primary task's: ``g`` on equal rows, with weights
  that no longer sum to 1 once a constraint is active),
  ``fairgrad`` (weights solving ``G w = w^(-1/alpha)``: ``d`` scales as
  ``c^((1 - alpha) / (1 + alpha))`` with the gradients, not at all for the default
  ``alpha = 1``), and every
  ``"<name>+tension"``: it returns its base's direction during the first ``window`` calls, but
  then adds tension vectors of unit length (``scale="unit"``, the paper's) and the feasibility
  projection, so the result is neither the base's scale nor any fixed one.
* ``"<name>*T"``: ``"sum"`` when the base is ``"convex"`` (its weights then sum to ``T``),
  else ``"unnormalised"``.

MGDA-UB (Sener and Koltun, NeurIPS 2018, Sec. 3.3) is MGDA run on the gradients with respect to
the shared representation, a capture mode of the optimizer, not another aggregator: write
``MultiTaskOptimizer(..., aggregator="mgda", capture="representation")`` and
``opt.backward(losses, features=z)``; ``get("mgda-ub")`` raises a ``ValueError`` saying so.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Literal

from ._base import Aggregator

__all__ = ["aliases", "available", "get", "needs_validation", "register", "resolve",
           "scale_convention"]

_PKG = "torch_mtlgrad.aggregators"

ScaleConvention = Literal["sum", "convex", "unnormalised"]
SCALE_CONVENTIONS: tuple[str, ...] = ("sum", "convex", "unnormalised")

# name -> (module path, class name, is a gradient aggregator that accepts "+tension")
_ENTRIES: dict[str, tuple[str, str, bool]] = {
    "mean": (f"{_PKG}.mean", "Mean", True),
    "sum": (f"{_PKG}.mean", "Sum", True),
    "mgda": (f"{_PKG}.mgda", "MinNorm", True),
    "central": (f"{_PKG}.central", "Central", True),
    "pcgrad": (f"{_PKG}.pcgrad", "PCGrad", True),
    "graddrop": (f"{_PKG}.graddrop", "GradDrop", True),
    "gradvac": (f"{_PKG}.gradvac", "GradVac", True),
    "imtlg": (f"{_PKG}.imtlg", "IMTLG", True),
    "cagrad": (f"{_PKG}.cagrad", "CAGrad", True),
    "nashmtl": (f"{_PKG}.nashmtl", "NashMTL", True),
    "upgrad": (f"{_PKG}.upgrad", "UPGrad", True),
    "dualproj": (f"{_PKG}.dualproj", "DualProj", True),
    "alignedmtl": (f"{_PKG}.alignedmtl", "AlignedMTL", True),
    "moco": (f"{_PKG}.moco", "MoCo", True),
    "rlw": (f"{_PKG}.rlw", "RLW", True),
    "constant": (f"{_PKG}.constant", "Constant", True),
    "uw": (f"{_PKG}.uw", "UncertaintyWeighting", False),
    "gradnorm": (f"{_PKG}.gradnorm", "GradNorm", False),
    "dwa": (f"{_PKG}.dwa", "DWA", False),
    "famo": (f"{_PKG}.famo", "FAMO", False),
    "excessmtl": (f"{_PKG}.excessmtl", "ExcessMTL", True),
    "sdmgrad": (f"{_PKG}.sdmgrad", "SDMGrad", True),
    "fairgrad": (f"{_PKG}.fairgrad", "FairGrad", True),
    "imtll": (f"{_PKG}.imtll", "IMTLL", False),
    "imtl": (f"{_PKG}.imtl", "IMTL", True),
    "stch": (f"{_PKG}.stch", "STCH", False),
    "gls": (f"{_PKG}.gls", "GLS", False),
    "pbi": (f"{_PKG}.pbi", "PBI", False),
    "cosmos": (f"{_PKG}.cosmos", "COSMOS", False),
    "modo": (f"{_PKG}.modo", "MoDo", True),
    "crmogm": (f"{_PKG}.crmogm", "CRMOGM", True),
    "dbmtl": (f"{_PKG}.dbmtl", "DBMTL", True),
    "trimmedmean": (f"{_PKG}.trimmedmean", "TrimmedMean", True),
    "krum": (f"{_PKG}.krum", "Krum", True),
    "config": (f"{_PKG}.config", "ConFIG", True),
    "pcd": (f"{_PKG}.pcd", "PCD", True),
    "autolambda": (f"{_PKG}.autolambda", "AutoLambda", False),
}

# The one alias table: another spelling -> canonical name (lower case, no whitespace).
_ALIASES: dict[str, str] = {
    "nash-mtl": "nashmtl", "nash_mtl": "nashmtl",
    "pc-grad": "pcgrad", "pc_grad": "pcgrad",
    "imtl-g": "imtlg", "imtl_g": "imtlg",
    "grad-drop": "graddrop", "grad_drop": "graddrop",
    "grad-vac": "gradvac", "grad_vac": "gradvac",
    "aligned-mtl": "alignedmtl", "aligned_mtl": "alignedmtl",
    "dual-proj": "dualproj", "dual_proj": "dualproj",
    "up-grad": "upgrad", "up_grad": "upgrad",
    "ca-grad": "cagrad", "ca_grad": "cagrad",
    "min-norm": "mgda", "min_norm": "mgda", "minnorm": "mgda",
    "uncertainty": "uw", "uncertainty-weighting": "uw", "uncertainty_weighting": "uw",
    "grad-norm": "gradnorm", "grad_norm": "gradnorm",
    "excess-mtl": "excessmtl", "excess_mtl": "excessmtl",
    "sdm-grad": "sdmgrad", "sdm_grad": "sdmgrad",
    "fair-grad": "fairgrad", "fair_grad": "fairgrad",
    "imtl-l": "imtll", "imtl_l": "imtll",
    "cr-mogm": "crmogm", "cr_mogm": "crmogm",
    "db-mtl": "dbmtl", "db_mtl": "dbmtl",
    "trimmed-mean": "trimmedmean", "trimmed_mean": "trimmedmean",
    "con-fig": "config", "con_fig": "config",
    "auto-lambda": "autolambda", "auto_lambda": "autolambda",
}

# The one table of scale conventions (module docstring; checked numerically by the tests).
_SCALES: dict[str, ScaleConvention] = {
    "mean": "convex", "sum": "sum", "mgda": "convex", "central": "convex", "pcgrad": "sum",
    "graddrop": "sum", "gradvac": "sum", "imtlg": "convex", "cagrad": "unnormalised",
    "nashmtl": "unnormalised", "upgrad": "unnormalised", "dualproj": "unnormalised",
    "alignedmtl": "sum", "moco": "unnormalised", "rlw": "convex", "constant": "sum",
    "uw": "unnormalised", "gradnorm": "sum", "dwa": "sum", "famo": "convex",
    "excessmtl": "convex",
    "sdmgrad": "convex",
    "fairgrad": "unnormalised",
    "imtll": "unnormalised", "imtl": "unnormalised", "stch": "convex", "gls": "unnormalised",
    "pbi": "unnormalised", "cosmos": "unnormalised",
    "modo": "convex", "crmogm": "convex", "dbmtl": "unnormalised",
    "trimmedmean": "unnormalised", "krum": "convex", "config": "sum", "pcd": "unnormalised",
    "autolambda": "unnormalised",
}

# Methods with required arguments: name -> (keyword example for get(), constructor example).
_EXAMPLES: dict[str, tuple[str, str]] = {
    "constant": ("weights=[1.0, 2.0]", "Constant([1.0, 2.0])"),
}

# Methods that read a validation batch at every step (MultiTaskOptimizer(validation_losses=fn)):
# a call without one is an error (needs_validation).
_NEEDS_VALIDATION: frozenset[str] = frozenset({"autolambda"})

_MGDA_UB = ("{name!r} is not a separate aggregator: MGDA-UB (Sener and Koltun, NeurIPS 2018, "
            "Sec. 3.3) is MGDA run on the gradients with respect to the shared representation, "
            "a capture mode of the optimizer: use MultiTaskOptimizer(..., aggregator={target!r}, "
            "capture='representation') and opt.backward(losses, features=z), z the shared "
            "encoder's output")
# Names that are not aggregators: name -> (message, the aggregator to use instead).
_NOT_AGGREGATORS: dict[str, tuple[str, str]] = {
    "mgda-ub": (_MGDA_UB, "mgda"), "mgda_ub": (_MGDA_UB, "mgda"), "mgdaub": (_MGDA_UB, "mgda"),
}

# The wrapper of the "*T" suffix, imported on first use like the entries (it imports ``get``).
_RESCALED = (f"{_PKG}.rescaled", "Rescaled")

TENSION_SUFFIX = "+tension"
RESCALE_SUFFIX = "*t"  # written "*T"; names are compared in lower case
_ALL_NAMES = "all names: torch_mtlgrad.aggregators.available()"


def register(name: str, module: str, cls: str, *, tensionable: bool = True,
             scale: ScaleConvention | None = None, example: tuple[str, str] | None = None) -> None:
    """Add a method under ``name`` (lower case) as ``module:cls``.

    ``scale`` is its scale convention (see :func:`scale_convention`; ``None``: not recorded, and
    :func:`scale_convention` then raises); ``example`` a ``(keyword example, constructor
    example)`` pair shown when a required argument is missing, e.g.
    ``("weights=[1.0, 2.0]", "Constant([1.0, 2.0])")``.
    """
    if name != name.lower() or "+" in name or "*" in name or name != "".join(name.split()):
        raise ValueError(f"aggregator names are lower case without '+', '*' or spaces, got {name!r}")
    if name in _ALIASES or name in _NOT_AGGREGATORS:
        raise ValueError(f"{name!r} is already another name's alias or a reserved name")
    if scale is not None and scale not in SCALE_CONVENTIONS:
        raise ValueError(f"scale must be one of {SCALE_CONVENTIONS} or None, got {scale!r}")
    _ENTRIES[name] = (module, cls, tensionable)
    _SCALES.pop(name, None)
    _EXAMPLES.pop(name, None)
    if scale is not None:
        _SCALES[name] = scale
    if example is not None:
        _EXAMPLES[name] = example


def available() -> list[str]:
    """All canonical names ``get`` accepts, including every ``"<name>+tension"`` (not the
    aliases, see :func:`aliases`, nor the ``"*T"`` forms, see :class:`Rescaled`)."""
    names = sorted(_ENTRIES)
    return names + [n + TENSION_SUFFIX for n in names if _ENTRIES[n][2]]


def aliases() -> dict[str, str]:
    """A copy of the alias table: other spelling -> canonical name.  Every alias also takes the
    suffixes (``"nash-mtl+tension"``, ``"min-norm*T"``).

    Example:
        >>> aliases()["nash-mtl"]
        'nashmtl'
    """
    return dict(_ALIASES)


def _resolve(name: str) -> type:
    module, cls, _ = _ENTRIES[name]
    return getattr(importlib.import_module(module), cls)


def _parse(name: Any) -> tuple[str, bool, bool, str]:
    """``name`` -> (canonical base name, tension, rescale, the canonical full name).  Raises
    ``ValueError`` for an unknown name (with suggestions) or suffixes out of order."""
    if not isinstance(name, str):
        raise TypeError(f"aggregator name must be a string, got {type(name).__name__}")
    key = "".join(name.split()).lower()
    rescale = key.endswith(RESCALE_SUFFIX)
    core = key[: -len(RESCALE_SUFFIX)] if rescale else key
    if RESCALE_SUFFIX in core:
        fixed = core.replace(RESCALE_SUFFIX, "", 1) + "*T"
        raise ValueError(
            f"aggregator {name!r}: the suffixes go in the order '<name>+tension*T' (the rescaling "
            f"applies last, to the tensioned direction): write {fixed!r}.  (A tensioner on a "
            "rescaled base is another method; build it as Tensioned(Rescaled(...)).)")
    tension = core.endswith(TENSION_SUFFIX)
    base = core[: -len(TENSION_SUFFIX)] if tension else core
    if base in _NOT_AGGREGATORS:
        message, target = _NOT_AGGREGATORS[base]
        target += (TENSION_SUFFIX if tension else "") + ("*T" if rescale else "")
        raise ValueError(message.format(name=name, target=target))
    base = _ALIASES.get(base, base)
    if base not in _ENTRIES:
        raise ValueError(_unknown_message(name, core, rescale))
    full = base + (TENSION_SUFFIX if tension else "") + ("*T" if rescale else "")
    if tension and not _ENTRIES[base][2]:
        raise ValueError(f"{base!r} is a loss weighting, not a direction: it takes no '+tension' "
                         f"(got {name!r}); write {base + ('*T' if rescale else '')!r}")
    return base, tension, rescale, full


def _canonical(candidate: str) -> str:
    """An accepted name form (alias or canonical, with or without '+tension') in canonical form."""
    tension = candidate.endswith(TENSION_SUFFIX)
    base = candidate[: -len(TENSION_SUFFIX)] if tension else candidate
    return _ALIASES.get(base, base) + (TENSION_SUFFIX if tension else "")


def _or_list(items: list[str]) -> str:
    quoted = [repr(s) for s in items]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _unknown_message(name: str, core: str, rescale: bool) -> str:
    accepted = []
    for n in [*_ENTRIES, *_ALIASES]:
        accepted.append(n)
        if _ENTRIES[_ALIASES.get(n, n)][2]:
            accepted.append(n + TENSION_SUFFIX)
    suggestions: list[str] = []
    for m in difflib.get_close_matches(core, accepted, n=6, cutoff=0.6):
        c = _canonical(m) + ("*T" if rescale else "")
        if c not in suggestions:
            suggestions.append(c)
    if suggestions:
        return f"unknown aggregator {name!r}; did you mean {_or_list(suggestions[:3])}? ({_ALL_NAMES})"
    return (f"unknown aggregator {name!r}: the methods are {', '.join(sorted(_ENTRIES))} (each "
            f"gradient aggregator also as '<name>+tension'; aliases: "
            f"torch_mtlgrad.aggregators.aliases()) ({_ALL_NAMES})")


def _parameters(cls: type) -> tuple[list[inspect.Parameter], bool]:
    """The constructor's named parameters, and whether it takes ``**kwargs``."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):  # no signature to read: let the constructor check
        return [], True
    params = [p for p in sig.parameters.values()
              if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    return params, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def _check_arguments(base: str, full: str, cls: type, kwargs: dict[str, Any],
                     extra: list[str]) -> None:
    """Unknown keyword arguments and missing required ones, as errors that name the method,
    what it accepts and an example (``extra``: the wrapper's arguments, also accepted)."""
    params, any_kw = _parameters(cls)
    names = [p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY]
    unknown = [k for k in kwargs if k not in names]
    if unknown and not any_kw:
        accepted = names + [e for e in extra if e not in names]
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, accepted, n=1, cutoff=0.6)
            if close:
                hints.append(f"{close[0]!r} for {k!r}")
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise TypeError(
            f"aggregator {full!r} ({cls.__name__}) takes no argument(s) "
            f"{', '.join(map(repr, unknown))}{hint}; its arguments are "
            f"{', '.join(accepted) if accepted else 'none'}")
    missing = [p.name for p in params if p.default is inspect.Parameter.empty
               and p.name not in kwargs]
    if missing:
        kw_example, obj_example = _EXAMPLES.get(
            base, (", ".join(f"{m}=..." for m in missing),
                   f"{cls.__name__}({', '.join(f'{m}=...' for m in missing)})"))
        if TENSION_SUFFIX in full:
            obj_example = f"Tensioned({obj_example})"
        if full.endswith("*T"):
            obj_example = f"Rescaled({obj_example})"
        raise TypeError(
            f"aggregator {full!r} needs the argument(s) {', '.join(missing)}: e.g. "
            f"get({full!r}, {kw_example}) or MultiTaskOptimizer(..., aggregator={obj_example})")


def get(name: str, **kwargs: Any) -> Aggregator:
    """Build an aggregator from its short name, e.g. ``get("central+tension", alpha=0.3)``.

    Names are case- and whitespace-insensitive and may be aliases (:func:`aliases`).  With
    ``+tension`` the keyword arguments of :class:`Tensioned` (``alpha``, ``window``,
    ``loss_term``, ``feasibility``, ``scale``, ``solver``, ``check_losses``, ``solver_iters``)
    go to it, the rest to the base method.  A final ``*T`` wraps the result in
    :class:`Rescaled` (direction times the number of tasks), e.g. ``get("mgda+tension*T")``.

    A misspelt name is a ``ValueError`` suggesting the closest names; a missing required
    argument or an unknown one is a ``TypeError`` naming the method, its arguments and an
    example call.

    Example:
        >>> from torch_mtlgrad.aggregators import get
        >>> get("mgda+tension", alpha=0.5)
        Tensioned(MinNorm(normalization='none', method='auto'), alpha=0.5, window=10)
        >>> type(get("Nash-MTL")).__name__
        'NashMTL'
        >>> get("mgda*T")
        Rescaled(MinNorm(normalization='none', method='auto'))
    """
    base, tension, rescale, full = _parse(name)
    cls = _resolve(base)
    tkw: dict[str, Any] = {}
    extra: list[str] = []
    if tension:
        from .tension import Tensioned

        extra = [p.name for p in _parameters(Tensioned)[0] if p.name != "base"]
        tkw = {k: kwargs.pop(k) for k in extra if k in kwargs}
    _check_arguments(base, full, cls, kwargs, extra)
    agg: Aggregator = cls(**kwargs)
    if tension:
        agg = Tensioned(agg, **tkw)
    if rescale:
        module, name_ = _RESCALED
        agg = getattr(importlib.import_module(module), name_)(agg)
    return agg


def scale_convention(name: str) -> str:
    """The scale convention of the method ``name`` (with its default arguments):

    * ``"sum"``: ``T`` equal rows ``g`` give ``d = T g`` on every call: the learning rate of
      ``sum(losses).backward()`` applies (``sum``, ``pcgrad``, ``dwa``, ...).
    * ``"convex"``: the weights sum to 1 (``mean``, ``mgda``, ...): the step on the shared
      parameters is about ``1/T`` of the sum's; ``"<name>*T"`` (:class:`Rescaled`) restores it.
    * ``"unnormalised"``: neither (``cagrad``, ``upgrad``, ``nashmtl``, ``moco``, ``uw``, every
      ``"+tension"`` form).

    The module docstring says why for each method.  Any accepted name form (aliases, suffixes).

    Example:
        >>> scale_convention("mgda"), scale_convention("mgda*T"), scale_convention("pc-grad")
        ('convex', 'sum', 'sum')
    """
    base, tension, rescale, _ = _parse(name)
    if base not in _SCALES:
        raise ValueError(f"no scale convention recorded for {base!r}: pass scale= to register()")
    conv: str = "unnormalised" if tension else _SCALES[base]
    if rescale:
        conv = "sum" if conv == "convex" else "unnormalised"
    return conv


def needs_validation(name: str) -> bool:
    """Whether the method ``name`` (any accepted name form) reads a validation batch at every
    step: ``MultiTaskOptimizer(..., validation_losses=fn)``; its calls without one raise.

    Example:
        >>> needs_validation("auto-lambda"), needs_validation("mgda")
        (True, False)
    """
    return _parse(name)[0] in _NEEDS_VALIDATION


def resolve(aggregator: str | Aggregator) -> Aggregator:
    """An aggregator object as it is, or :func:`get` of a short name.

    Example:
        >>> resolve("mean")
        Mean()
    """
    if isinstance(aggregator, Aggregator):
        return aggregator
    if isinstance(aggregator, str):
        return get(aggregator)
    raise TypeError(f"aggregator must be a name or an Aggregator, got {type(aggregator).__name__}")
