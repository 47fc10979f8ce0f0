"""Captures through a ``torch.compile``'d model: every route that traverses the graph more than
once (all but the ``"sum"`` loss-only pass) keeps it between its backward passes, which a
compiled backward allows only when it was built without *donated buffers*.

How PyTorch decides (``torch/_functorch/_aot_autograd/``):

* A compiled region's backward is compiled once.  Its saved activations that are neither
  inputs nor outputs of the forward are *donated* (``fw_metadata.bw_donated_idxs``): Inductor
  may reuse their memory inside the backward, so the graph can be traversed only once.
* The backward is compiled lazily at its first traversal, and that traversal decides: one that
  keeps the graph (``retain_graph=True``: the loop's first task) compiles it without donated
  buffers.  It is compiled with them when its first traversal frees the graph (a plain
  ``backward()``, the ``"sum"`` route), when it is compiled at the forward already (dynamic
  shapes: a batch of another size), or when it is loaded from the compile cache written by such
  a run.  A later traversal that keeps the graph then raises ``RuntimeError: This backward
  function was compiled with non-empty donated buffers ...`` -- rightly: bypassing that check
  gives wrong gradients.
* With ``torch._functorch.config.donated_buffer = False`` at the forward's compile, no buffer is
  donated (``bw_donated_idxs`` is ``None``), but the runtime check still fires for a backward
  compiled at the forward unless the flag is also off at the backward.

So :func:`through_compiled` runs a route as it is; when that check fires it looks at the
compiled regions of the graph: if none donates a buffer (the check fired on ``None``) it runs
the route again with ``donated_buffer=False`` for the duration of that call only (and from then
on straight away for graphs whose compiled regions donate nothing); if one does, it raises
:class:`DonatedBufferError` naming the fix.  Nothing is changed globally.  Eager graphs pay
nothing (no graph walk until the check has fired once).

The batched modes cannot run through a compiled region at all (its backward runs Inductor's
kernels, which ``vmap``/``is_grads_batched`` cannot batch): :func:`explain_batched_failure` names
the cause, and the step falls back to the loop with one warning.  The feature and representation
modes need the heads outside the compiled region (the gradients with respect to a compiled
region's output ``z`` miss what its own heads send back to ``z``): :func:`check_features`
refuses features that come out of a region computing the losses too.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import Tensor

__all__ = ["DonatedBufferError", "check_features", "compiled_regions", "donates",
           "explain_batched_failure", "is_donated_error", "through_compiled"]

F = TypeVar("F", bound=Callable[..., Any])

_NODE = "CompiledFunctionBackward"

# Compiled regions seen to need the flag off at the backward although they donate nothing (their
# backward was compiled at the forward under donated_buffer=False).  While any is alive, a kept
# traversal first walks its graph and, if every compiled region in it donates nothing, runs with
# the flag off at once instead of failing first.
_NEED_FLAG: weakref.WeakSet[type] = weakref.WeakSet()


class DonatedBufferError(RuntimeError):
    """The losses' graph runs through a compiled backward built with donated buffers, so it
    cannot be traversed more than once."""


DONATED_MESSAGE = (
    "the losses' graph runs through a torch.compile'd region whose backward was compiled with "
    "donated buffers (its saved activations are reused during its one backward), so it can be "
    "traversed only once, but this step's capture traverses it more than once. A backward is "
    "compiled so when its first traversal frees the graph (a plain backward() through the same "
    "compiled graph, even of another instance of the model, or aggregator='sum'), at the "
    "forward under dynamic shapes (e.g. a last batch of another size), or when it comes from "
    "the compile cache of such a run. Fix, for the compiled model only: run its forward calls, "
    "from the first one, under "
    "`with torch._functorch.config.patch(donated_buffer=False): out = model(x)` "
    "(torch._dynamo.reset() first if it was already compiled in this process); for dynamic "
    "shapes alone, torch.compile(model, dynamic=False) also avoids it. Nothing was written")


FEATURES_MESSAGE = (
    "features= comes out of a torch.compile'd region that also computes the losses from it: "
    "compile the encoder alone (model.encoder = torch.compile(model.encoder)) for "
    "capture='feature' or 'representation' (the losses' gradients with respect to the features "
    "never leave the compiled backward); the other capture modes need no features=")


def is_donated_error(err: BaseException) -> bool:
    """Whether ``err`` is PyTorch's refusal to keep the graph of a compiled backward with
    donated buffers."""
    return isinstance(err, RuntimeError) and "donated buffer" in str(err)


def compiled_regions(roots: Sequence[Tensor] | Tensor) -> list[type]:
    """The compiled regions (AOT autograd functions) in the graph below ``roots``, each once.

    Example:
        >>> import torch
        >>> x = torch.ones(2, requires_grad=True)
        >>> compiled_regions([(x * 2).sum()])
        []
    """
    tensors = [roots] if isinstance(roots, Tensor) else list(roots)
    stack = [t.grad_fn for t in tensors if isinstance(t, Tensor) and t.grad_fn is not None]
    seen: set[int] = set()
    found: dict[int, type] = {}
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == _NODE:
            cls = getattr(node, "_forward_cls", None)
            if cls is not None:
                found.setdefault(id(cls), cls)
        stack.extend(fn for fn, _ in node.next_functions)
    return list(found.values())


def check_features(losses: Sequence[Tensor], features: Tensor) -> None:
    """Raise ``NotImplementedError`` when ``features`` is an output of a compiled region that the
    losses also reach through another of its outputs (the heads compiled with the encoder): the
    gradients with respect to ``features`` would then read zero.  Costs nothing unless
    ``features`` comes straight out of a compiled region."""
    region = features.grad_fn
    if region is None or type(region).__name__ != _NODE:
        return
    k = features.output_nr
    stack = [loss.grad_fn for loss in losses]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node is region:  # a loss computed inside the region itself
            raise NotImplementedError(FEATURES_MESSAGE)
        for fn, index in node.next_functions:
            if fn is region:
                if index != k:
                    raise NotImplementedError(FEATURES_MESSAGE)
            else:
                stack.append(fn)


def donates(region: type) -> bool:
    """Whether this compiled region's backward reuses saved buffers (so that keeping its graph
    would be wrong).  Unknown internals count as donating: the check is then never bypassed."""
    meta = getattr(region, "metadata", None)
    if meta is None or not hasattr(meta, "bw_donated_idxs"):
        return True
    if not meta.bw_donated_idxs:
        return False  # None (compiled with the flag off) or [] (compiled keeping the graph)
    # Not compiled yet: a traversal that keeps the graph compiles it without donated buffers.
    return getattr(region, "compiled_bw", True) is not None


def _config() -> Any:
    from torch._functorch import config  # imported by any compile; not at our import

    return config


def _flag_off() -> Any:
    return _config().patch(donated_buffer=False)


def _regions_safe(roots: Sequence[Tensor] | Tensor) -> bool | None:
    """``True``: compiled regions, none donating; ``False``: one donates; ``None``: none."""
    regions = compiled_regions(roots)
    if not regions:
        return None
    return not any(donates(r) for r in regions)


def through_compiled(route: F) -> F:
    """Wrap a capture route whose first argument is its roots (the losses or the features) so
    that it runs through compiled regions that allow a kept graph, and raises
    :class:`DonatedBufferError` through one that does not.

    The route is run again only when its first kept traversal failed at the check, which happens
    before any gradient is returned (so nothing it writes is left half done: it is all rewritten).
    """

    @functools.wraps(route)
    def run(roots: Sequence[Tensor] | Tensor, *args: Any, **kwargs: Any) -> Any:
        if _NEED_FLAG and _config().donated_buffer and _regions_safe(roots):
            with _flag_off():
                return route(roots, *args, **kwargs)
        try:
            return route(roots, *args, **kwargs)
        except RuntimeError as err:
            if isinstance(err, DonatedBufferError) or not is_donated_error(err) \
                    or not _config().donated_buffer:
                raise
            regions = compiled_regions(roots)
            if not regions or any(donates(r) for r in regions):
                raise DonatedBufferError(DONATED_MESSAGE) from err
            for r in regions:
                _NEED_FLAG.add(r)
        with _flag_off():
            return route(roots, *args, **kwargs)

    return run  # type: ignore[return-value]


def explain_batched_failure(err: BaseException, roots: Sequence[Tensor] | Tensor) -> BaseException:
    """The error a failed batched pass raises: ``err`` itself, unless the graph holds a compiled
    region (then a ``NotImplementedError`` that says so, for the fallback's one warning)."""
    if is_donated_error(err) or not compiled_regions(roots):
        return err
    first = str(err).splitlines()[0][:80] if str(err) else type(err).__name__
    return NotImplementedError(
        "the graph runs through a torch.compile'd region, whose compiled backward cannot be "
        f"batched by vmap ({first})")

