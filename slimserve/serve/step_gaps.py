"""Whether the engine loop is kept waiting between steps, from the timings the engine process reports."""

from __future__ import annotations

import threading
from collections import deque


class StepGaps:
    """Time between the end of one step and the start of the next while requests are unfinished: what
    the engine loop spends outside the model (taking commands, handing over outputs)."""

    def __init__(self, window: int = 100_000) -> None:
        self.gaps: deque[float] = deque(maxlen=window)
        self.steps: deque[float] = deque(maxlen=window)
        self.max_gap = 0.0
        # Recorded on the event loop, read from other threads too (tests, benchmarks).
        self._lock = threading.Lock()

    def record(self, step_s: float, gap_s: float | None) -> None:
        with self._lock:
            self.steps.append(step_s)
            if gap_s is not None:
                self.gaps.append(gap_s)
                self.max_gap = max(self.max_gap, gap_s)

    def reset(self) -> None:
        with self._lock:
            self.gaps.clear()
            self.steps.clear()
            self.max_gap = 0.0

    def summary(self) -> dict[str, float]:
        def stats(values: list[float]) -> dict[str, float]:
            if not values:
                return {"count": 0}
            values = sorted(values)
            pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]
            return {
                "count": len(values),
                "mean_ms": 1e3 * sum(values) / len(values),
                "p50_ms": 1e3 * pick(0.5),
                "p99_ms": 1e3 * pick(0.99),
                "max_ms": 1e3 * values[-1],
            }

        with self._lock:
            gaps, steps = list(self.gaps), list(self.steps)
        return {"gap": stats(gaps), "step": stats(steps)}
