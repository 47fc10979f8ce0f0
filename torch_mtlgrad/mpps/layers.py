"""Which layers of a backbone MPPS masks, where their neurons are, and how a mask is applied.

A neuron is an output channel of a convolution or an output feature of a ``Linear`` layer
(Shi et al., *Deep Multitask Learning with Progressive Parameter Sharing*, ICCV 2023, section 3.3).
The default selection is the backbone's last 6 ``Conv2d``/``Linear`` layers (the paper masks the
last layers of the shared backbone, section 4.3.1).  See the documentation's MPPS page.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["DEFAULT_KINDS", "MASKABLE", "mask_output", "neurons", "select_layers"]

logger = logging.getLogger(__name__)

_CONV = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
#: Module types whose outputs MPPS can mask (neurons = output channels / output features).
MASKABLE: tuple[type[nn.Module], ...] = (nn.Linear, *_CONV)
#: Module types the default ``layers=<count>`` selection picks.
DEFAULT_KINDS: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def neurons(module: nn.Module) -> tuple[int, int]:
    """(number of neurons, position of the neuron dim counted from the end of the output).

    Example:
        >>> neurons(nn.Conv2d(3, 5, 3)), neurons(nn.Linear(2, 7))
        ((5, -3), (7, -1))
    """
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(module, _CONV):
        return module.out_channels, -(len(module.kernel_size) + 1)
    raise TypeError(
        f"MPPS masks outputs of {', '.join(t.__name__ for t in MASKABLE)}; got {type(module).__name__}"
    )


def select_layers(
    backbone: nn.Module, layers: int | Sequence[nn.Module | str]
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs to mask, in order.

    ``layers`` is a count of the backbone's last ``Conv2d``/``Linear`` modules (registration
    order; all of them, logged at INFO, when there are fewer) or a sequence of its modules or of
    their names (any :data:`MASKABLE` type, each at most once).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3))
        >>> [n for n, _ in select_layers(net, 1)], [n for n, _ in select_layers(net, ["0"])]
        (['2'], ['0'])
    """
    named = list(backbone.named_modules())
    if isinstance(layers, int) and not isinstance(layers, bool):
        if layers < 1:
            raise ValueError(
                f"layers must be a positive count or a sequence of modules, got {layers}"
            )
        cands = [(n, m) for n, m in named if isinstance(m, DEFAULT_KINDS)]
        if not cands:
            raise ValueError(
                "the backbone has no Conv2d or Linear layer to mask; pass layers=[...]"
            )
        if len(cands) < layers:
            logger.info(
                "backbone has %d Conv2d/Linear layers, fewer than layers=%d: masking all of them",
                len(cands),
                layers,
            )
        return cands[-layers:]
    if (
        isinstance(layers, (str, nn.Module))
        or not isinstance(layers, Sequence)
        or len(layers) == 0
    ):
        raise TypeError(
            "layers must be a positive int or a non-empty sequence of modules/names"
        )
    by_id = {id(m): n for n, m in named}
    out: list[tuple[str, nn.Module]] = []
    for item in layers:
        if isinstance(item, str):
            try:
                module = backbone.get_submodule(item)
            except AttributeError as exc:
                raise ValueError(
                    f"layers: the backbone has no submodule named {item!r}"
                ) from exc
            name = item
        elif isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(
                    f"layers: {type(item).__name__} module is not part of the backbone"
                )
            module, name = item, by_id[id(item)]
        else:
            raise TypeError(
                f"layers entries must be modules or names, got {type(item).__name__}"
            )
        neurons(module)  # type check with a clear error
        if any(module is m for _, m in out):
            raise ValueError(f"layers: module {name!r} is given twice")
        out.append((name, module))
    return out


def mask_output(
    output: Tensor, mask: Tensor, dim: int, batched_tasks: int | None, name: str
) -> Tensor:
    """``output`` with its neurons multiplied by ``mask``.

    ``mask`` is ``[N]`` (one task's mask, sequential form, ``batched_tasks=None``) or ``[T, N]``
    (batched form, ``batched_tasks=T``: ``output`` is ``[T * B, ...]`` in task-major blocks and
    block ``t`` gets row ``t``).  ``dim`` is the neuron dim counted from the end (:func:`neurons`),
    ``name`` the layer's name for the error messages.

    Example:
        >>> import torch
        >>> mask_output(torch.ones(2, 3), torch.tensor([1.0, 0.0, 1.0]), -1, None, "fc")
        tensor([[1., 0., 1.],
                [1., 0., 1.]])
        >>> mask_output(torch.ones(4, 2), torch.eye(2), -1, 2, "fc")  # two tasks, batch 2
        tensor([[1., 0.],
                [1., 0.],
                [0., 1.],
                [0., 1.]])
    """
    mask = mask.to(output.dtype)
    n = mask.shape[-1]
    ch = output.dim() + dim
    if ch < 0 or output.shape[ch] != n:
        raise ValueError(
            f"MPPS: output of layer {name!r} has shape {tuple(output.shape)}, "
            f"expected {n} neurons at dim {dim}"
        )
    if batched_tasks is None:
        return output * mask.reshape([n] + [1] * (-dim - 1))
    # batched: output is [T*B, ...] with task-major blocks
    t = batched_tasks
    if ch < 1 or output.shape[0] % t != 0:
        raise ValueError(
            f"MPPS batched form: output of layer {name!r} has shape "
            f"{tuple(output.shape)}; its first dim must be T * batch (T = {t})"
        )
    shape = [t, output.shape[0] // t, *output.shape[1:]]
    mshape = [t] + [1] * output.dim()
    mshape[ch + 1] = n
    return (output.reshape(shape) * mask.reshape(mshape)).reshape(output.shape)
