"""MPPS: multi-task learning with progressive parameter sharing (Shi et al., ICCV 2023).

* :class:`MPPS` (``sharing.py``) -- the module: per-task masks on a backbone's neurons through
  forward hooks, the eq. (3) objective and the target update of Algorithm 1.  Its parts:
  :mod:`~torch_mtlgrad.mpps.layers` (which layers, where their neurons are, applying a mask),
  :mod:`~torch_mtlgrad.mpps.hooks` (the hooks and the ``task`` / ``batched`` contexts that draw
  the masks), :mod:`~torch_mtlgrad.mpps.objective` (eq. (3): KL + REINFORCE /
  reparameterisation, the baseline) and :mod:`~torch_mtlgrad.mpps.curriculum` (EC readouts, the
  schedule and the end-of-epoch target update).
* :mod:`~torch_mtlgrad.mpps.schedulers` -- exclusive-capacity schedules (Separ, FullShare, StepN,
  Linear, Quad).
* :mod:`~torch_mtlgrad.mpps.ec` -- exclusive capacity of a neuron, a layer, a distribution.
* :mod:`~torch_mtlgrad.mpps.masks` -- the Bernoulli and Gaussian mask families.
* :mod:`~torch_mtlgrad.mpps.target` -- the target update.

Usable with or without :class:`~torch_mtlgrad.MultiTaskOptimizer`; it imports nothing from it.
The rules of the implementation, with the paper's equations, are on the documentation's MPPS page.
"""

from .ec import distribution_ec, layer_ec, neuron_ec, task_shares
from .masks import exclusive_phi, kl_bernoulli, kl_divergence, kl_gaussian
from .schedulers import ECScheduler, FullShare, Linear, Quad, Separ, StepN
from .sharing import MASKABLE, MPPS
from .target import update_target

__all__ = [
    "MASKABLE",
    "MPPS",
    "ECScheduler",
    "FullShare",
    "Linear",
    "Quad",
    "Separ",
    "StepN",
    "distribution_ec",
    "exclusive_phi",
    "kl_bernoulli",
    "kl_divergence",
    "kl_gaussian",
    "layer_ec",
    "neuron_ec",
    "task_shares",
    "update_target",
]
