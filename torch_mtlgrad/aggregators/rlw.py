"""Random loss weighting (RLW; Lin et al., "Reasonable Effectiveness of Random Weighting: A Litmus
Test for Multi-Task Learning", TMLR 2022).

Every call draws fresh task weights and returns ``d = w^T J``.  The default distribution is the
one CoNAL's retraining uses (Yue et al., AAAI 2023, eq. 3): ``u ~ U[0, 1]^T`` normalised to sum 1,
``w = u / sum_t u_t``.  The RLW paper's own normalisation is a softmax of the sample; its
standard-normal variant (``w = softmax(z)``, ``z ~ N(0, I)``, the default of LibMTL and TorchJD)
is ``distribution="normal"``.  The weights need neither ``J`` nor ``G``.

This module also holds :class:`RandomSource`, the seeded random number generator that every
random aggregator here (RLW, PCGrad, GradDrop, GradVac) draws from, so that their draws are
reproducible and checkpointed.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from ._base import WeightedAggregator

__all__ = ["RLW", "RandomSource", "SeededState"]

Distribution = Literal["uniform", "normal"]


class RandomSource:
    """The random draws of one aggregator: a :class:`torch.Generator` whose state is checkpointed.

    Args:
        generator: a generator to draw from (its device decides where the numbers are drawn;
            they are then moved to the device of ``J``).  Mutually exclusive with ``seed``.
        seed: seed of a new CPU generator.  With neither argument, the seed is drawn once from
            PyTorch's global generator, so ``torch.manual_seed`` makes the run reproducible.

    :meth:`state_dict` holds the generator's state, so resuming from a checkpoint draws the same
    numbers as not stopping; :meth:`reset` returns the generator to its state at construction.

    Example:
        >>> src = RandomSource(seed=0)
        >>> a = src.rand(3, dtype=torch.float32, device=torch.device("cpu"))
        >>> src.reset()
        >>> bool((src.rand(3, dtype=torch.float32, device=torch.device("cpu")) == a).all())
        True
    """

    def __init__(self, generator: torch.Generator | None = None, seed: int | None = None) -> None:
        if generator is not None and seed is not None:
            raise ValueError("pass either generator or seed, not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if generator is None:
            generator = torch.Generator()
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            generator.manual_seed(seed)
        self.generator = generator
        self._initial_state = generator.get_state()

    @property
    def device(self) -> torch.device:
        """Where the numbers are drawn."""
        return self.generator.device

    def rand(self, *shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``U[0, 1)`` samples of ``shape`` drawn on the generator's device, put on ``device``."""
        x = torch.rand(shape, generator=self.generator, dtype=dtype, device=self.device)
        return x.to(device, non_blocking=True)

    def randn(self, *shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``N(0, 1)`` samples of ``shape`` (see :meth:`rand`)."""
        x = torch.randn(shape, generator=self.generator, dtype=dtype, device=self.device)
        return x.to(device, non_blocking=True)

    def randperm(self, n: int) -> Tensor:
        """A uniformly random permutation of ``0..n-1`` (int64, on the generator's device)."""
        return torch.randperm(n, generator=self.generator, device=self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"rng_state": self.generator.get_state(), "rng_device": str(self.device)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng_state" not in state:
            raise ValueError(
                "the state has no 'rng_state': it was not saved by a random aggregator")
        saved = state.get("rng_device", "cpu")
        if torch.device(saved).type != self.device.type:
            raise ValueError(
                f"the saved generator state is for a {saved!r} generator, this one is on "
                f"{str(self.device)!r}; build the aggregator with a generator on {saved!r}"
            )
        self.generator.set_state(state["rng_state"])

    def reset(self) -> None:
        self.generator.set_state(self._initial_state)


class SeededState:
    """Mixin for aggregators whose only state is their :class:`RandomSource` ``self.rng``:
    ``state_dict``/``load_state_dict``/``reset`` are the generator's."""

    rng: RandomSource

    def state_dict(self) -> dict[str, Any]:
        return self.rng.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.load_state_dict(state)

    def reset(self) -> None:
        self.rng.reset()


class RLW(SeededState, WeightedAggregator):
    """Random loss weighting: ``d = w^T J`` with fresh random weights each call (Lin et al. 2022).

    Args:
        distribution: ``"uniform"`` (default): ``w = u / sum(u)``,
            ``u ~ U[0, 1]^T``; ``"normal"``: ``w = softmax(z)``, ``z ~ N(0, I_T)`` (the RLW
            paper's softmax normalisation of a standard normal sample).
        generator: a :class:`torch.Generator` to draw from (see :class:`RandomSource`).
        seed: seed of a private generator (exclusive with ``generator``).

    The weights are positive and sum to 1.  They need neither ``J`` nor ``G`` (``gramian_only``
    is false only because there is nothing to compute from ``G``).  The generator's state is in
    :meth:`state_dict`, so a resumed run draws the same next weights.

    Absent tasks: the call draws ``T_present`` numbers (the weights of the present tasks, which
    sum to 1); an absent task gets weight 0 and the generator advances as on any call.

    Example:
        >>> import torch
        >>> agg = RLW(seed=0)
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> d = agg(J)
        >>> round(float(agg.weights.sum()), 6), bool((agg.weights > 0).all())
        (1.0, True)
    """

    paper = ("Lin et al., *Reasonable Effectiveness of Random Weighting: A Litmus Test for "
             "Multi-Task Learning*, TMLR 2022")
    summary = "random loss weighting, `w ~ U[0,1]^T / sum` each step (seeded)"
    random = True

    stateful = True

    def __init__(self, distribution: Distribution = "uniform", *,
                 generator: torch.Generator | None = None, seed: int | None = None) -> None:
        super().__init__()
        if distribution not in ("uniform", "normal"):
            raise ValueError(f"distribution must be 'uniform' or 'normal', got {distribution!r}")
        self.distribution = distribution
        self.rng = RandomSource(generator, seed)

    def weighting(self, G: Tensor | None, losses: Tensor | None, *, num_tasks: int,
                  dtype: torch.dtype, device: torch.device) -> Tensor:
        T = num_tasks
        if self.distribution == "normal":
            return torch.softmax(self.rng.randn(T, dtype=dtype, device=device), dim=0)
        u = self.rng.rand(T, dtype=dtype, device=device)
        total = u.sum()
        # sum(u) = 0 has probability ~2^-24T; fall back to uniform weights there (no 0/0).
        return torch.where(total > 0, u / total.clamp_min(torch.finfo(dtype).tiny),
                           torch.full_like(u, 1.0 / T))

    def __repr__(self) -> str:
        return f"RLW(distribution={self.distribution!r})"
