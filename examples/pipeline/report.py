"""Text output of the one-command runner: a chain's result, its time breakdown, percentiles.

Kept apart from the process handling so that both stay short. Rows are the three model
calls as the orchestrator measured them, the whole chain inside the orchestrator, and
the end-to-end request as the runner measured it (which adds the runner-to-orchestrator
hop). In every row transport = total - compute.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple


class Row(NamedTuple):
    stage: str
    where: str
    total_ms: float
    compute_ms: float
    transport_ms: float


def rows(chain: dict[str, Any], end_to_end_ms: float) -> list[Row]:
    """The breakdown of one ``/chain`` answer, plus the runner's own measurement."""
    timing = chain["timing"]
    out = [
        Row(s["stage"], s["service"], s["total_ms"], s["compute_ms"], s["transport_ms"])
        for s in timing["stages"]
    ]
    compute = timing["compute_ms"]
    out.append(Row("chain", "orchestrator", timing["total_ms"], compute, timing["transport_ms"]))
    out.append(Row("end to end", "runner", end_to_end_ms, compute, end_to_end_ms - compute))
    return out


def table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Columns padded to fit; the first left-aligned, the others right-aligned."""
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def result(chain: dict[str, Any]) -> str:
    image = chain["image"]
    return "\n".join(
        [
            f"transcript  {chain['transcript']}",
            f"analysis    {chain['analysis']}",
            f"image       {image['width']}x{image['height']} PNG, {image['bytes']} bytes,"
            f" sha256 {image['sha256'][:16]}...",
        ]
    )


def breakdown(sample: Sequence[Row]) -> str:
    header = ["stage", "served by", "total ms", "compute ms", "transport ms"]
    return table(
        header,
        [
            [r.stage, r.where, f"{r.total_ms:.1f}", f"{r.compute_ms:.1f}", f"{r.transport_ms:.2f}"]
            for r in sample
        ],
    )


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank percentile (`p` in 0..100): a value that was actually measured."""
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


def percentiles(samples: Sequence[Sequence[Row]]) -> str:
    """p50 and p90 of every row over many chains."""
    header = ["stage", "total p50", "total p90", "compute p50", "transport p50", "transport p90"]
    body = []
    for i, first in enumerate(samples[0]):
        totals = [s[i].total_ms for s in samples]
        computes = [s[i].compute_ms for s in samples]
        transports = [s[i].transport_ms for s in samples]
        cells = [
            percentile(totals, 50),
            percentile(totals, 90),
            percentile(computes, 50),
            percentile(transports, 50),
            percentile(transports, 90),
        ]
        body.append([first.stage, *(f"{c:.2f}" if c < 10 else f"{c:.1f}" for c in cells)])
    return table(header, body)


def summary(samples: Sequence[Sequence[Row]]) -> str:
    """One line to compare with per-request HTTPS: transport per model call and per chain."""
    calls = [r.transport_ms for s in samples for r in s[:-2]]
    chains = [s[-1] for s in samples]
    overhead = percentile([r.transport_ms for r in chains], 50)
    share = overhead / percentile([r.total_ms for r in chains], 50) * 100
    return (
        f"transport per model call: p50 {percentile(calls, 50):.2f} ms, "
        f"p90 {percentile(calls, 90):.2f} ms; per chain end to end: p50 {overhead:.2f} ms "
        f"({share:.1f} % of the request)"
    )
