"""Exclusive-capacity schedulers of MPPS (paper section 3.5, Figure 3).

A scheduler maps an epoch index ``e`` in ``[0, epochs)`` to the EC the target distribution should
have during that epoch, and groups epochs into *courses*: the target is rebuilt (Algorithm 1) only
when the course changes.  Past the last epoch the last value is kept.

* :class:`Separ`: EC 1 throughout (one course).
* :class:`FullShare`: EC 0 throughout (one course).
* :class:`StepN`: ``N`` courses of equal length, course ``k`` at EC ``1 - k / (N - 1)``.
* :class:`Linear` (the paper's default): one course per epoch, EC falling linearly from 1 to 0.
* :class:`Quad`: one course per epoch, EC ``1 - s^2`` (or ``(1 - s)^2``, ``convex=True``).

Frozen epochs: the first course is lengthened by ``frozen_start`` epochs and the last by
``frozen_end`` (``frozen=F`` sets both), so EC is 1 for epochs ``0 .. frozen_start`` and 0 for
the last ``frozen_end + 1`` epochs.  The ``M = epochs - frozen_start - frozen_end`` epochs in
between carry the schedule: with ``j = e - frozen_start`` and ``s = j / (M - 1)``, Linear gives
``1 - s`` and StepN gives course ``floor(j N / M)``.  The paper gives no formula for Quad; we use
``1 - s^2`` (stays exclusive longer, shares fast at the end) and offer the other parabola.
"""

from __future__ import annotations

import math

__all__ = ["ECScheduler", "FullShare", "Linear", "Quad", "Separ", "StepN"]


def _check_epochs(epochs: int) -> int:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    return epochs


def _check_frozen(frozen: int | tuple[int, int]) -> tuple[int, int]:
    pair = (frozen, frozen) if isinstance(frozen, int) else tuple(frozen)
    if len(pair) != 2 or any(isinstance(f, bool) or not isinstance(f, int) or f < 0 for f in pair):
        raise ValueError(
            f"frozen must be an int >= 0 or a pair (start, end) of them, got {frozen!r}"
        )
    return int(pair[0]), int(pair[1])


class ECScheduler:
    """Base class: ``scheduler(epoch) -> EC`` and ``scheduler.course(epoch) -> course index``.

    Subclasses implement :meth:`_middle` (value and course of middle epoch ``j``, ``0 <= j < M``)
    or override :meth:`value` and :meth:`course`.

    Example:
        >>> sch = Linear(6, frozen=1)
        >>> sch(0), sch(2), sch.course(0) == sch.course(1), sch.course(2)
        (1.0, 0.6666666666666667, True, 1)
    """

    def __init__(self, epochs: int, frozen: int | tuple[int, int] = 0, min_middle: int = 1) -> None:
        self.epochs = _check_epochs(epochs)
        self.frozen_start, self.frozen_end = _check_frozen(frozen)
        self.middle = self.epochs - self.frozen_start - self.frozen_end
        if self.middle < min_middle:
            raise ValueError(
                f"{type(self).__name__} needs at least {min_middle} epochs between the frozen ones: "
                f"epochs={self.epochs}, frozen=({self.frozen_start}, {self.frozen_end}) leave "
                f"{self.middle}"
            )

    def _index(self, epoch: int) -> int:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        j = min(epoch, self.epochs - 1) - self.frozen_start
        return min(max(j, 0), self.middle - 1)

    def _middle(self, j: int) -> tuple[float, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def value(self, epoch: int) -> float:
        """Scheduled EC of the target during ``epoch`` (0-based), in ``[0, 1]``."""
        return self._middle(self._index(epoch))[0]

    def course(self, epoch: int) -> int:
        """Course index of ``epoch``; Algorithm 1's target update runs when it changes."""
        return self._middle(self._index(epoch))[1]

    def __call__(self, epoch: int) -> float:
        return self.value(epoch)

    def curve(self) -> list[float]:
        """The scheduled EC of every epoch, ``[value(0), ..., value(epochs - 1)]`` (Figure 3)."""
        return [self.value(e) for e in range(self.epochs)]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(epochs={self.epochs}, "
            f"frozen=({self.frozen_start}, {self.frozen_end}))"
        )


class Separ(ECScheduler):
    """EC 1 for the whole run: the target stays fully exclusive (paper's "Separ").

    Example:
        >>> Separ(3).curve()
        [1.0, 1.0, 1.0]
    """

    def __init__(self, epochs: int) -> None:
        super().__init__(epochs)

    def _middle(self, j: int) -> tuple[float, int]:
        return 1.0, 0

    def __repr__(self) -> str:
        return f"Separ(epochs={self.epochs})"


class FullShare(ECScheduler):
    """EC 0 for the whole run: the target is hard parameter sharing (paper's "FullShare").

    Example:
        >>> FullShare(3).curve()
        [0.0, 0.0, 0.0]
    """

    def __init__(self, epochs: int) -> None:
        super().__init__(epochs)

    def _middle(self, j: int) -> tuple[float, int]:
        return 0.0, 0

    def __repr__(self) -> str:
        return f"FullShare(epochs={self.epochs})"


class StepN(ECScheduler):
    """``n`` courses of equal length, course ``k`` at EC ``1 - k / (n - 1)`` (paper's "StepN").

    The middle epochs are split as evenly as integers allow (``floor(j n / M)``); the first course
    also holds the ``frozen_start`` epochs and the last the ``frozen_end`` ones.

    Example:
        >>> StepN(8, n=3, frozen=1).curve()
        [1.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0]
    """

    def __init__(self, epochs: int, n: int, frozen: int | tuple[int, int] = 0) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"n (number of courses) must be an int >= 2, got {n!r}")
        self.n = n
        super().__init__(epochs, frozen, min_middle=n)

    def _middle(self, j: int) -> tuple[float, int]:
        k = (j * self.n) // self.middle
        return 1.0 - k / (self.n - 1), k

    def __repr__(self) -> str:
        return f"StepN(epochs={self.epochs}, n={self.n}, frozen=({self.frozen_start}, {self.frozen_end}))"


class Linear(ECScheduler):
    """One course per middle epoch, EC ``1 - j / (M - 1)`` (the paper's default scheduler).

    Example:
        >>> Linear(7, frozen=1).curve()
        [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """

    def __init__(self, epochs: int, frozen: int | tuple[int, int] = 0) -> None:
        super().__init__(epochs, frozen, min_middle=2)

    def _middle(self, j: int) -> tuple[float, int]:
        return 1.0 - j / (self.middle - 1), j


class Quad(ECScheduler):
    """One course per middle epoch, EC ``1 - s^2`` with ``s = j / (M - 1)`` (``(1 - s)^2`` if convex).

    The paper names a quadratic schedule without its formula; the default ``1 - s^2`` lies above
    :class:`Linear` (keeps tasks apart longer), ``convex=True`` lies below it.

    Example:
        >>> Quad(5).curve()
        [1.0, 0.9375, 0.75, 0.4375, 0.0]
        >>> Quad(5, convex=True).curve()
        [1.0, 0.5625, 0.25, 0.0625, 0.0]
    """

    def __init__(
        self, epochs: int, frozen: int | tuple[int, int] = 0, convex: bool = False
    ) -> None:
        self.convex = bool(convex)
        super().__init__(epochs, frozen, min_middle=2)

    def _middle(self, j: int) -> tuple[float, int]:
        s = j / (self.middle - 1)
        v = (1.0 - s) ** 2 if self.convex else 1.0 - s * s
        return (0.0 if math.isclose(v, 0.0, abs_tol=1e-15) else v), j

    def __repr__(self) -> str:
        return (
            f"Quad(epochs={self.epochs}, frozen=({self.frozen_start}, {self.frozen_end}), "
            f"convex={self.convex})"
        )
