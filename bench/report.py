"""Turn `Results` into two tables (steps, targets) as aligned text or Markdown, and a raw
JSON dump of every sample for later analysis."""

from __future__ import annotations

import json
from typing import Any

from results import DATAMOVER, Results, Step

MiB = 1 << 20
STEP_COLUMNS = (
    "Workload",
    "Step",
    "Tool",
    "Median s",
    "Runs",
    "Range s",
    "Files/s",
    "MiB/s",
    "Peak RSS MiB",
    "vs datamover",
    "Notes",
)
TARGET_COLUMNS = ("Workload", "Target", "Measured", "Goal", "Verdict", "Why")
NUMERIC_COLUMNS = frozenset(
    ("Median s", "Runs", "Range s", "Files/s", "MiB/s", "Peak RSS MiB", "vs datamover", "Measured")
)
LEGEND = (
    "vs datamover: this tool's median wall time / datamover's for the same step "
    "(above 1: datamover is faster). Times are whole commands, wall clock, median of the "
    "successful runs (Runs: successful/attempted); peak RSS is the largest over the runs."
)


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def _step_notes(step: Step) -> str:
    parts: list[str] = []
    if step.errors:
        first = step.errors[0]
        others = len(set(step.errors)) - 1
        more = f" (+{others} other errors)" if others else ""
        parts.append(f"FAILED {step.errors.count(first)}x: {first}{more}")
    internal = step.payload_median("seconds")
    if internal is not None:
        parts.append(f"self-reported {internal:.2f} s")
    for key, label in (("uploaded_bytes", "uploaded"), ("downloaded_bytes", "downloaded")):
        value = step.payload_median(key)
        if value is not None:
            parts.append(f"{label} {value / MiB:.1f} MiB")
    parts.extend(step.notes)
    return "; ".join(parts)


def step_rows(results: Results) -> list[list[str]]:
    """One row per step and tool."""
    rows = []
    for step in results.steps.values():
        median = step.median
        base = results.median(step.workload, step.step, DATAMOVER)
        ratio = median / base if median is not None and base else None
        times = step.times
        rows.append(
            [
                step.workload,
                step.step,
                step.tool,
                _num(median, "{:.2f}"),
                f"{len(step.samples)}/{len(step.samples) + len(step.errors)}",
                f"{min(times):.2f}-{max(times):.2f}" if times else "—",
                # Files per second says nothing about a one-file workload.
                _num(step.files / median if median and step.files > 1 else None, "{:,.0f}"),
                _num(step.bytes / MiB / median if median and step.bytes else None, "{:,.1f}"),
                _num(step.peak_rss_mib, "{:.0f}"),
                _num(ratio, "{:.2f}x"),
                _step_notes(step),
            ]
        )
    return rows


def target_rows(results: Results) -> list[list[str]]:
    """One row per target."""
    return [
        [
            t.workload,
            t.name,
            _num(t.measured, t.fmt),
            f"{t.op} {t.fmt.format(t.threshold)}",
            t.verdict,
            t.why_missing if t.measured is None else "",
        ]
        for t in results.targets
    ]


def text_table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    """Aligned columns; numbers right-aligned."""
    widths = [
        max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)
    ]

    def fmt(cells: list[str] | tuple[str, ...]) -> str:
        out = []
        for i, cell in enumerate(cells):
            right = columns[i] in NUMERIC_COLUMNS and cells is not columns
            out.append(cell.rjust(widths[i]) if right else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt(columns), "  ".join("-" * w for w in widths)]
    lines.extend(fmt(r) for r in rows)
    return "\n".join(lines)


def markdown_table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines.extend("| " + " | ".join(cell(c) for c in r) + " |" for r in rows)
    return "\n".join(lines)


def render_text(results: Results, header: list[str]) -> str:
    """The report for a terminal."""
    parts = [*header, ""]
    parts += [*results.problems, ""] if results.problems else []
    parts += [text_table(STEP_COLUMNS, step_rows(results)), "", LEGEND, ""]
    parts += [text_table(TARGET_COLUMNS, target_rows(results))]
    return "\n".join(parts) + "\n"


def render_markdown(results: Results, header: list[str]) -> str:
    """The report as a Markdown document."""
    parts = ["# datamover benchmark", "", *(f"- {line}" for line in header), ""]
    parts += [*(f"- **{p}**" for p in results.problems), ""] if results.problems else []
    parts += ["## Steps", "", markdown_table(STEP_COLUMNS, step_rows(results)), "", LEGEND, ""]
    parts += ["## Targets", "", markdown_table(TARGET_COLUMNS, target_rows(results)), ""]
    return "\n".join(parts)


def raw_json(results: Results, header: list[str]) -> str:
    """Every sample, payload and error, for later analysis."""
    data: dict[str, Any] = {
        "header": header,
        "problems": results.problems,
        "steps": [
            {
                "workload": s.workload,
                "step": s.step,
                "tool": s.tool,
                "files": s.files,
                "bytes": s.bytes,
                "seconds": s.times,
                "peak_rss_kib": [x.peak_rss_kib for x in s.samples],
                "payloads": s.payloads,
                "errors": s.errors,
                "notes": s.notes,
            }
            for s in results.steps.values()
        ],
        "targets": [
            {
                "workload": t.workload,
                "name": t.name,
                "measured": t.measured,
                "op": t.op,
                "threshold": t.threshold,
                "verdict": t.verdict,
                "why": t.why_missing,
            }
            for t in results.targets
        ],
    }
    return json.dumps(data, indent=2) + "\n"
