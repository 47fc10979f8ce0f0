"""``capture="timed"`` off the GPU: time the per-task loop against the batched pass on the first
steps and keep the faster one.

Which exact capture is faster on a CPU depends on the model, the batch, T and the number of
threads (the documentation's Performance page has measurements both ways).  Where no rule
of thumb covers a setup, ``capture="timed"`` measures: for each ``(T, candidate)`` it alternates
the loop and the batched candidate (``"feature"`` when ``features=`` is given, else
``"batched"``) for ``warmup`` untimed and then ``trials`` timed steps each, and from then on uses
the batched candidate only if its best time beats the loop's best by the ``margin`` (the loop
needs far less memory, so it wins ties).  A batched pass that cannot run on the model decides for the loop at once.

All candidates give the same ``J`` up to float rounding (tested), so the choice changes speed and
memory, and the last bits of the result: two runs may choose differently, which is why the
default ``capture="auto"`` uses a fixed rule instead (the loop on the CPU, the fastest or within
noise of the fastest everywhere measured).  The choice is kept in the
optimizer's ``state_dict`` so that a run resumed after it goes on with the same capture.  On
CUDA no timing is done (it would need host synchronisation); the rule there is fixed (see
:class:`~torch_mtlgrad.MultiTaskOptimizer`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CaptureTuner"]


class CaptureTuner:
    """Chooses between the loop and a batched capture by timing both on the first steps.

    Args:
        warmup: untimed steps per candidate first (the first batched pass pays for set-up).
        trials: timed steps per candidate after the warm-up.
        margin: the batched candidate is chosen when its best time is below ``margin`` times the
            loop's best time.

    Example:
        >>> tuner = CaptureTuner(warmup=0, trials=1)
        >>> key = tuner.key(10, features=False)
        >>> tuner.mode(key)
        ('loop', True)
        >>> tuner.record(key, "loop", 0.50, timed=True)
        >>> tuner.mode(key)
        ('batched', True)
        >>> tuner.record(key, "batched", 0.30, timed=True)
        >>> tuner.mode(key), tuner.choices
        (('batched', False), {'T=10,batched': 'batched'})
    """

    def __init__(self, warmup: int = 1, trials: int = 2, margin: float = 0.9) -> None:
        if not (isinstance(warmup, int) and warmup >= 0 and isinstance(trials, int) and trials >= 1):
            raise ValueError(f"warmup must be an int >= 0 and trials an int >= 1, got {warmup!r}, {trials!r}")
        if not 0 < margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {margin!r}")
        self.warmup, self.trials, self.margin = warmup, trials, float(margin)
        self._runs: dict[str, dict[str, Any]] = {}

    @staticmethod
    def key(num_tasks: int, features: bool) -> str:
        """The setting a choice is made for: T and which batched candidate applies."""
        return f"T={num_tasks},{'feature' if features else 'batched'}"

    @staticmethod
    def _candidates(key: str) -> tuple[str, str]:
        return "loop", key.rsplit(",", 1)[1]

    def _run(self, key: str) -> dict[str, Any]:
        if key not in self._runs:
            self._runs[key] = {"step": 0, "times": {m: [] for m in self._candidates(key)},
                               "choice": None}
        return self._runs[key]

    def mode(self, key: str) -> tuple[str, bool]:
        """``(mode, timed)`` for the next step in setting ``key``; ``timed``: record its time."""
        run = self._runs.get(key)  # read only: asking changes no state
        if run is not None and run["choice"] is not None:
            return run["choice"], False
        i = 0 if run is None else run["step"]
        return self._candidates(key)[i % 2], i >= 2 * self.warmup

    def record(self, key: str, mode: str, seconds: float, timed: bool) -> None:
        """The capture of the step :meth:`mode` asked for took ``seconds``."""
        run = self._run(key)
        if run["choice"] is not None:
            return
        run["step"] += 1
        if timed:
            run["times"][mode].append(float(seconds))
        if run["step"] >= 2 * (self.warmup + self.trials):
            loop, batched = self._candidates(key)
            fast = min(run["times"][batched]) < self.margin * min(run["times"][loop])
            run["choice"] = batched if fast else loop

    def decide(self, key: str, mode: str) -> None:
        """Fix the choice for ``key`` (e.g. the loop when the batched pass cannot run)."""
        self._run(key)["choice"] = mode

    @property
    def choices(self) -> dict[str, str]:
        """The choices made so far, by setting."""
        return {k: r["choice"] for k, r in self._runs.items() if r["choice"] is not None}

    def state_dict(self) -> dict[str, Any]:
        return {k: {"step": r["step"], "times": {m: list(v) for m, v in r["times"].items()},
                    "choice": r["choice"]} for k, r in self._runs.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict`'s output (checked first: nothing changes on a malformed one)."""
        if not isinstance(state, dict):
            raise TypeError(f"capture tuning state must be a dict, got {type(state).__name__}")
        runs: dict[str, dict[str, Any]] = {}
        for k, r in state.items():
            if not (isinstance(k, str) and "," in k and isinstance(r, dict)
                    and set(r) == {"step", "times", "choice"}):
                raise ValueError(f"malformed capture tuning entry {k!r}")
            cands = self._candidates(k)
            step, times, choice = r["step"], r["times"], r["choice"]
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"capture tuning entry {k!r}: step must be an int >= 0, got {step!r}")
            if not (isinstance(times, dict) and set(times) == set(cands) and all(
                    isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v)
                    for v in times.values())):
                raise ValueError(f"capture tuning entry {k!r}: times must map {list(cands)} to lists of seconds")
            if choice is not None and choice not in cands:
                raise ValueError(f"capture tuning entry {k!r}: choice must be one of {list(cands)} or None, "
                                 f"got {choice!r}")
            runs[k] = {"step": step, "times": {m: [float(x) for x in v] for m, v in times.items()},
                       "choice": choice}
        self._runs = runs
