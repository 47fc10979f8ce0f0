"""Mask distributions of MPPS: exclusive initialisation, sampling, log-probabilities and KL.

Shi et al., *Deep Multitask Learning with Progressive Parameter Sharing* (ICCV 2023), section 3.3
and 3.4.  Every neuron ``n`` of a masked layer has a vector ``phi[n] in [0, 1]^T``; the owner of
the neuron is ``argmax_t phi[n, t]`` and always uses it (mask 1); every other task (a *guest*)
uses it through a mask drawn from its own distribution:

* Bernoulli: ``m ~ B(phi[n, t])`` (``r_B(v) = v``), gradients for ``phi`` by REINFORCE;
* Gaussian:  ``m = 1 + r(phi[n, t]) * z``, ``z ~ N(0, 1)``, ``r(v) = sqrt((1 - v) / v)``
  (the paper's ``r_G``), gradients by the reparameterisation trick.

Parameterisation.  ``phi`` is stored as logits ``a`` with ``phi = sigmoid(a)``.  This keeps
``phi`` in ``(0, 1)`` under any optimiser step without projection, and makes every quantity
below numerically clean: ``log phi = logsigmoid(a) = -softplus(-a)``, ``r(phi) = exp(-a / 2)`` exactly, the
score of a Bernoulli mask is ``d log q(m) / da = m - phi``, and the Gaussian KL is a function of
``a_q - a_p`` alone.  All functions here are pure (tensor in, tensor out) and act elementwise, so
each entry ``phi[n, t]`` only ever influences its own terms.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FAMILIES",
    "Family",
    "bernoulli_log_prob",
    "exclusive_phi",
    "gaussian_scale",
    "kl_bernoulli",
    "kl_divergence",
    "kl_gaussian",
    "logit",
    "owners",
    "sample_masks",
]

logger = logging.getLogger(__name__)

Family = Literal["bernoulli", "gaussian"]
FAMILIES: tuple[str, ...] = ("bernoulli", "gaussian")


def _logsigmoid(x: Tensor) -> Tensor:
    # -softplus(-x) == logsigmoid(x); F.logsigmoid is far slower on small CPU tensors with more
    # than one intra-op thread (about 4 ms against 1.5 us per call on a 6 x 2 tensor, torch 2.13).
    return -F.softplus(-x)


def check_family(family: str) -> Family:
    """Return ``family`` lower-cased if it names a mask family, else raise ``ValueError``."""
    if not isinstance(family, str) or family.lower() not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return family.lower()  # type: ignore[return-value]


def exclusive_phi(
    num_neurons: int,
    num_tasks: int,
    eps: float = 0.01,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Exclusive initialisation of one layer (paper section 3.5, "Exclusive initialization").

    The ``num_neurons`` neurons are split into ``num_tasks`` contiguous parts of (almost) equal
    size, part ``t`` owned by task ``t``: ``phi[n, owner] = 1 - eps`` and ``phi[n, guest] = eps``.
    Neuron ``n`` belongs to part ``floor(n * T / N)``.  When the layer has fewer neurons than
    tasks, some tasks own none of its neurons (a warning is logged).

    Args:
        num_neurons: output channels (Conv) or output features (Linear) of the layer, ``N >= 1``.
        num_tasks: ``T >= 2``.
        eps: in ``(0, 0.5)``; the paper uses 0.01.

    Returns:
        ``[N, T]`` tensor of probabilities.

    Example:
        >>> exclusive_phi(4, 2, eps=0.01)
        tensor([[0.9900, 0.0100],
                [0.9900, 0.0100],
                [0.0100, 0.9900],
                [0.0100, 0.9900]])
    """
    if not isinstance(num_neurons, int) or num_neurons < 1:
        raise ValueError(f"num_neurons must be a positive int, got {num_neurons!r}")
    if not isinstance(num_tasks, int) or num_tasks < 2:
        raise ValueError(
            f"num_tasks must be an int >= 2 (MPPS shares between tasks), got {num_tasks!r}"
        )
    if not (0.0 < float(eps) < 0.5):
        raise ValueError(f"eps must lie in (0, 0.5), got {eps!r}")
    if num_neurons < num_tasks:
        logger.warning(
            "layer has %d neurons for %d tasks: some tasks own none of its neurons",
            num_neurons,
            num_tasks,
        )
    owner = torch.div(torch.arange(num_neurons) * num_tasks, num_neurons, rounding_mode="floor")
    phi = torch.full((num_neurons, num_tasks), float(eps), dtype=dtype)
    phi[torch.arange(num_neurons), owner] = 1.0 - float(eps)
    return phi.to(device) if device is not None else phi


def owners(phi_or_logits: Tensor) -> Tensor:
    """Owner task of every neuron: ``argmax_t phi[n, t]`` (ties go to the lowest task index).

    Works on probabilities or on logits (sigmoid is increasing, the argmax is the same).

    Example:
        >>> owners(torch.tensor([[0.2, 0.7, 0.1], [0.5, 0.5, 0.0]]))
        tensor([1, 0])
    """
    return phi_or_logits.argmax(dim=-1)


def logit(p: Tensor) -> Tensor:
    """``log(p / (1 - p))``, the inverse of ``sigmoid``.

    Example:
        >>> logit(torch.tensor([0.5, 0.75]))
        tensor([0.0000, 1.0986])
    """
    return torch.log(p) - torch.log1p(-p)


def gaussian_scale(logits: Tensor) -> Tensor:
    """``r(phi) = sqrt((1 - phi) / phi)`` of the Gaussian mask, as ``exp(-a / 2)`` with ``a = logit(phi)``.

    Paper section 3.3 (the translation function ``r_G``).

    Example:
        >>> gaussian_scale(logit(torch.tensor([0.5, 0.2])))
        tensor([1., 2.])
    """
    return torch.exp(-0.5 * logits)


def sample_masks(
    logits: Tensor,
    is_owner: Tensor,
    family: Family,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one mask for the neurons of one layer and one task.

    ``logits`` are ``logit(phi[:, t])`` (shape ``[N]``), ``is_owner`` a bool ``[N]`` marking the
    neurons task ``t`` owns; owned neurons get mask 1.  Guests draw

    * Bernoulli: ``m = 1[u < phi]``, ``u ~ U(0, 1)``; the result carries no gradient (REINFORCE
      supplies the gradient of ``phi``, see :func:`bernoulli_log_prob`);
    * Gaussian: ``m = 1 + r(phi) * z``, ``z ~ N(0, 1)``; differentiable in ``logits``
      (reparameterisation trick, paper section 3.4).

    One uniform (or normal) number is drawn for every neuron, owner or not, so the random stream
    consumed depends only on the layer size.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> m = sample_masks(torch.zeros(5), torch.tensor([True, False, False, False, False]),
        ...                  "bernoulli", g)
        >>> m[0].item(), bool(((m == 0) | (m == 1)).all())
        (1.0, True)
    """
    family = check_family(family)
    if logits.dim() != 1 or is_owner.shape != logits.shape:
        raise ValueError(
            f"logits and is_owner must both have shape [N], got {tuple(logits.shape)} and "
            f"{tuple(is_owner.shape)}"
        )
    one = torch.ones((), dtype=logits.dtype, device=logits.device)
    if family == "bernoulli":
        u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
        m = (u < torch.sigmoid(logits.detach())).to(logits.dtype)
    else:
        z = torch.randn(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
        m = 1.0 + gaussian_scale(logits) * z
    return torch.where(is_owner, one, m)


def bernoulli_log_prob(mask: Tensor, logits: Tensor) -> Tensor:
    """Elementwise ``log B(m; phi) = m log phi + (1 - m) log(1 - phi)`` with ``phi = sigmoid(logits)``.

    Its gradient in ``logits`` is the REINFORCE score ``m - phi`` (paper section 3.4, [63]).

    Example:
        >>> bernoulli_log_prob(torch.tensor([1.0, 0.0]), torch.zeros(2))
        tensor([-0.6931, -0.6931])
    """
    return mask * _logsigmoid(logits) + (1.0 - mask) * _logsigmoid(-logits)


def kl_bernoulli(q_logits: Tensor, p_logits: Tensor) -> Tensor:
    """Elementwise ``KL(B(q) || B(p))`` in closed form, both given by their logits.

    ``q log(q / p) + (1 - q) log((1 - q) / (1 - p))``: zero iff ``q == p``, otherwise positive
    (clamped at 0 against rounding when ``q`` and ``p`` nearly match).

    Example:
        >>> kl_bernoulli(logit(torch.tensor([0.5, 0.9])), logit(torch.tensor([0.5, 0.5])))
        tensor([0.0000, 0.3681])
    """
    q = torch.sigmoid(q_logits)
    kl = q * (_logsigmoid(q_logits) - _logsigmoid(p_logits)) + (1.0 - q) * (
        _logsigmoid(-q_logits) - _logsigmoid(-p_logits)
    )
    # The two terms cancel when q ~ p; rounding can then leave -1e-17 (found by hypothesis).
    return kl.clamp_min(0.0)


def kl_gaussian(q_logits: Tensor, p_logits: Tensor) -> Tensor:
    """Elementwise ``KL(N(1, r(q)^2) || N(1, r(p)^2))`` in closed form, ``r(v) = sqrt((1 - v) / v)``.

    With ``r = exp(-a / 2)`` and ``x = a_p - a_q`` the usual
    ``log(s_p / s_q) + s_q^2 / (2 s_p^2) - 1/2`` becomes ``(exp(x) - 1 - x) / 2``: zero iff the
    two distributions match, otherwise positive (paper appendix 7.4 for the formula).

    Example:
        >>> kl_gaussian(logit(torch.tensor([0.5, 0.2])), logit(torch.tensor([0.5, 0.5])))
        tensor([0.0000, 0.8069])
    """
    x = p_logits - q_logits
    return (0.5 * (torch.expm1(x) - x)).clamp_min(0.0)  # >= 0 exactly; rounding near x = 0


def kl_divergence(family: Family, q_logits: Tensor, p_logits: Tensor) -> Tensor:
    """Elementwise KL of the chosen family (:func:`kl_bernoulli` or :func:`kl_gaussian`).

    Example:
        >>> kl_divergence("gaussian", torch.zeros(1), torch.zeros(1))
        tensor([0.])
    """
    family = check_family(family)
    return (
        kl_bernoulli(q_logits, p_logits)
        if family == "bernoulli"
        else kl_gaussian(q_logits, p_logits)
    )
