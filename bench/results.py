"""What the benchmark measured: steps (one command, repeated) and targets (a pass/fail check
computed from steps), plus the statistics the report needs."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from measure import Sample

DATAMOVER = "datamover"


@dataclass
class Step:
    """One tool doing one step of one workload, over all repetitions."""

    workload: str
    step: str
    tool: str
    files: int = 0
    bytes: int = 0
    samples: list[Sample] = field(default_factory=list)
    payloads: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def times(self) -> list[float]:
        """Wall seconds of the successful runs."""
        return [s.seconds for s in self.samples]

    @property
    def median(self) -> float | None:
        """Median wall seconds of the successful runs."""
        return statistics.median(self.times) if self.samples else None

    @property
    def peak_rss_mib(self) -> float | None:
        """Largest peak RSS over the successful runs, MiB."""
        values = [s.peak_rss_kib for s in self.samples if s.peak_rss_kib is not None]
        return max(values) / 1024 if values else None

    def payload_median(self, key: str) -> float | None:
        """Median of a numeric field of the commands' JSON output."""
        values = [p[key] for p in self.payloads if isinstance(p.get(key), int | float)]
        return statistics.median(values) if values else None

    def note(self, text: str) -> None:
        """Add a note once."""
        if text not in self.notes:
            self.notes.append(text)


@dataclass(frozen=True)
class Target:
    """A goal: `measured <op> threshold`."""

    workload: str
    name: str
    measured: float | None
    op: str  # ">=", "<=" or "<"
    threshold: float
    fmt: str = "{:.2f}"
    why_missing: str = ""

    @property
    def passed(self) -> bool:
        """Whether the measurement meets the goal (no measurement: no)."""
        if self.measured is None:
            return False
        m, t = self.measured, self.threshold
        return {">=": m >= t, "<=": m <= t, "<": m < t}[self.op]

    @property
    def verdict(self) -> str:
        """PASS, FAIL, or FAIL with the reason there is no number."""
        if self.measured is None:
            return "FAIL (not measured)"
        return "PASS" if self.passed else "FAIL"


class Results:
    """Steps in the order they were first touched, and the targets."""

    def __init__(self) -> None:
        self.steps: dict[tuple[str, str, str], Step] = {}
        self.targets: list[Target] = []
        self.problems: list[str] = []

    def step(self, workload: str, step: str, tool: str, files: int = 0, nbytes: int = 0) -> Step:
        """The step record, created on first use."""
        key = (workload, step, tool)
        if key not in self.steps:
            self.steps[key] = Step(workload, step, tool, files, nbytes)
        return self.steps[key]

    def get(self, workload: str, step: str, tool: str) -> Step | None:
        """The step record if it exists."""
        return self.steps.get((workload, step, tool))

    def median(self, workload: str, step: str, tool: str) -> float | None:
        """Median seconds of a step, if measured."""
        s = self.get(workload, step, tool)
        return s.median if s else None

    def ratio(self, workload: str, num: tuple[str, str], den: tuple[str, str]) -> float | None:
        """median(num) / median(den) for (step, tool) pairs of one workload."""
        a = self.median(workload, *num)
        b = self.median(workload, *den)
        if a is None or b is None or b <= 0:
            return None
        return a / b

    def missing(self, workload: str, *keys: tuple[str, str]) -> str:
        """The first recorded error among the steps a target needs."""
        for step, tool in keys:
            s = self.get(workload, step, tool)
            if s is None:
                return f"{tool} {step} did not run"
            if s.median is None:
                return f"{tool} {step}: {s.errors[0] if s.errors else 'no successful run'}"
        return ""

    def target(self, target: Target) -> None:
        """Record a target."""
        self.targets.append(target)
