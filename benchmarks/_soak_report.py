"""The fault soak's bookkeeping: from logs and a timeline to per-window figures and tables.

Why: the soak's verdict (nothing duplicated, nothing lost silently, every failure
explained) and its tables come from joining three independent records, kept apart so
that no process has to be trusted about itself:

* the load generator's JSON lines (a ``start`` and an ``end`` per request: outcome,
  reason, latency, transport attempts, client retries);
* each service's execution log (one line per request it *began*, by request id;
  the orchestrator's stage calls carry ``<chain id>.<stage>``) and the orchestrator's
  log of automatic re-sends;
* the soak's timeline (when each fault window and recovery window began and ended).

Requests belong to the window in which they *started*. A POST executed more than once
by the same service is a duplicate; a request with a ``start`` and no ``end`` was lost
silently; a failure without a reason is a bug. Latency percentiles are of successful
requests.

Not run by hand: `soak_pipeline.py` imports it.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLASSES = ("POST /chain", "GET /health")


@dataclass
class Window:
    """A stretch of the soak: the baseline, or a fault's fault or recovery window."""

    phase: str
    kind: str  # "baseline", "fault" or "recovery"
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Phase:
    """One fault: what was done, when, and its two windows."""

    name: str
    title: str
    windows: list[Window]
    events: list[tuple[float, str]] = field(default_factory=list)
    skipped: str | None = None
    inject: float = 0.0
    """When the fault was injected (its fault window starts a short lead-in earlier)."""
    settled_s: float | None = None
    """Seconds after the recovery window until the live health check passed (None: never)."""
    reset: bool = False
    """Whether every process was restarted after this phase, because it did not recover."""


@dataclass
class Logs:
    """Everything the soak's processes wrote."""

    starts: dict[str, dict[str, Any]]
    ends: dict[str, dict[str, Any]]
    executions: dict[str, list[tuple[float, str, str, str]]]  # role -> (t, id, method, path)
    stage_retries: list[tuple[float, str, int]]  # (t, request id, attempt)


def read_logs(workdir: Path, roles: Iterable[str]) -> Logs:
    starts: dict[str, dict[str, Any]] = {}
    ends: dict[str, dict[str, Any]] = {}
    load = workdir / "load.jsonl"
    if load.exists():
        for line in load.read_text().splitlines():
            try:
                item = json.loads(line)
            except ValueError:  # empty, or a line being written (progress reads run live)
                continue
            (starts if item.pop("ev") == "start" else ends)[item["id"]] = item
    executions: dict[str, list[tuple[float, str, str, str]]] = {}
    for role in roles:
        path = workdir / f"{role}.exec"
        rows: list[tuple[float, str, str, str]] = []
        if path.exists():
            for line in path.read_text().splitlines():
                t, request_id, method, url_path = line.split("\t")
                rows.append((float(t), request_id, method, url_path))
        executions[role] = rows
    retries: list[tuple[float, str, int]] = []
    path = workdir / "orchestrator.retries"
    if path.exists():
        for line in path.read_text().splitlines():
            t, request_id, attempt, *_ = line.split("\t")
            retries.append((float(t), request_id, int(attempt)))
    return Logs(starts, ends, executions, retries)


_PATTERNS = (
    (re.compile(r"\b\d+:[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}\b"), "<addr>"),
    (re.compile(r"\b\d{1,3}(\.\d{1,3}){3}:\d+\b"), "<ip:port>"),
    (re.compile(r"\b[0-9a-f]{4}(:[0-9a-f]{4}){3}\b"), "<fingerprint>"),
    (re.compile(r"\b\d+(\.\d+)?\s?(ms|s)\b"), "<t>"),
    (re.compile(r"\b\d{9,}\.\d+\b"), "<time>"),
    (re.compile(r"ovid1_[A-Za-z0-9_-]{20,}"), "<identity>"),
)


def normalise(reason: str, limit: int = 180) -> str:
    """A failure reason with addresses, ports and durations masked, for grouping."""
    for pattern, replacement in _PATTERNS:
        reason = pattern.sub(replacement, reason)
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q`-th percentile (0-100, linear interpolation); None without data."""
    if not values:
        return None
    if len(values) == 1:
        return float(values[0])
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[round(q) - 1]


def request_class(record: Mapping[str, Any]) -> str:
    return "POST /chain" if record["kind"] == "chain" else "GET /health"


def _executions_by_id(logs: Logs) -> dict[str, dict[str, int]]:
    """request id -> role -> times executed (POSTs only)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for role, rows in logs.executions.items():
        for _, request_id, method, _ in rows:
            if method == "POST" and request_id != "-":
                counts[request_id][role] += 1
    return counts


def duplicates_per_service(logs: Logs) -> dict[str, dict[str, int]]:
    """Per service: POSTs executed, distinct ids, duplicated ids, extra executions."""
    out: dict[str, dict[str, int]] = {}
    for role, rows in logs.executions.items():
        posts = Counter(rid for _, rid, method, _ in rows if method == "POST" and rid != "-")
        gets = Counter(rid for _, rid, method, _ in rows if method == "GET" and rid != "-")
        out[role] = {
            "post_executions": sum(posts.values()),
            "post_ids": len(posts),
            "duplicated_ids": sum(1 for n in posts.values() if n > 1),
            "extra_executions": sum(n - 1 for n in posts.values() if n > 1),
            "get_executions": sum(gets.values()),
            "get_reexecuted_ids": sum(1 for n in gets.values() if n > 1),
            "untagged": sum(1 for _, rid, _, _ in rows if rid == "-"),
        }
    return out


def summarise(
    records: Sequence[Mapping[str, Any]],
    executions: Mapping[str, Mapping[str, int]],
    stage_retries: Mapping[str, int],
) -> dict[str, Any]:
    """Figures for one (window, request class): `records` are the ``end`` lines."""
    ok = [r for r in records if r.get("outcome") == "ok"]
    failed = [r for r in records if r.get("outcome") != "ok"]
    reasons = Counter(normalise(r.get("reason") or "(no reason recorded)") for r in failed)
    transport_retries = sum(max(0, int(r.get("attempts", 0)) - 1) for r in records)
    client_retries = sum(int(r.get("client_retries", 0)) for r in records)
    stage = sum(stage_retries.get(str(r["id"]), 0) for r in records)
    duplicated = 0
    began = 0
    for r in records:
        if r["kind"] != "chain":
            continue
        prefix = str(r["id"])
        for request_id in (prefix, *(f"{prefix}.{s}" for s in ("stt", "llm", "image"))):
            duplicated += sum(n - 1 for n in executions.get(request_id, {}).values() if n > 1)
        if r.get("outcome") != "ok" and executions.get(prefix):
            began += 1
    latencies = sorted(float(r["ms"]) for r in ok)
    return {
        "sent": len(records),
        "ok": len(ok),
        "failed": len(failed),
        "failed_by_reason": dict(reasons.most_common()),
        "failed_without_reason": sum(1 for r in failed if not r.get("reason")),
        "failed_after_server_began": began,
        "retried": transport_retries + stage + client_retries,
        "retried_by_transport": transport_retries,
        "retried_by_transport_in_orchestrator": stage,
        "retried_by_client": client_retries,
        "duplicated": duplicated,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": latencies[-1] if latencies else None,
    }


def analyse(logs: Logs, phases: Sequence[Phase], baseline: Window) -> dict[str, Any]:
    """Every window's figures, the per-service duplicates and the verdict's inputs."""
    executions = _executions_by_id(logs)
    per_chain_retries: Counter[str] = Counter()
    for _, request_id, _ in logs.stage_retries:
        per_chain_retries[request_id.split(".")[0]] += 1
    windows = [baseline, *(w for p in phases for w in p.windows)]

    def in_window(window: Window) -> list[Mapping[str, Any]]:
        return [r for r in logs.ends.values() if window.start <= r["t0"] < window.end]

    results: list[dict[str, Any]] = []
    for window in windows:
        records = in_window(window)
        for cls in CLASSES:
            chosen = [r for r in records if request_class(r) == cls]
            figures = summarise(chosen, executions, per_chain_retries)
            results.append(
                {
                    "phase": window.phase,
                    "window": window.kind,
                    "start": window.start,
                    "seconds": round(window.seconds, 2),
                    "class": cls,
                    **figures,
                }
            )
    everything = {
        cls: summarise(
            [r for r in logs.ends.values() if request_class(r) == cls],
            executions,
            per_chain_retries,
        )
        for cls in CLASSES
    }
    unanswered = sorted(set(logs.starts) - set(logs.ends))
    return {
        "windows": results,
        "recovery": {p.name: recovery(p, logs) for p in phases if p.windows},
        "total": everything,
        "unanswered": unanswered,
        "per_service": duplicates_per_service(logs),
        "stage_retries": len(logs.stage_retries),
    }


def recovery(phase: Phase, logs: Logs) -> dict[str, Any]:
    """When chains started failing and when they stopped, in seconds from the injection.

    ``clean_from_s`` is the start of the first successful chain after the last failed
    one (None when the phase ended on a failure: not recovered within its windows).
    """
    start, end = phase.windows[0].start, phase.windows[-1].end
    chains = sorted(
        (r for r in logs.ends.values() if r["kind"] == "chain" and start <= r["t0"] < end),
        key=lambda r: float(r["t0"]),
    )
    failed = [r for r in chains if r.get("outcome") != "ok"]
    out: dict[str, Any] = {"chains": len(chains), "failed": len(failed)}
    if not failed:
        return {**out, "first_failure_s": None, "last_failure_s": None, "clean_from_s": 0.0}
    last = float(failed[-1]["t0"])
    after = next((r for r in chains if float(r["t0"]) > last and r.get("outcome") == "ok"), None)
    return {
        **out,
        "first_failure_s": round(float(failed[0]["t0"]) - phase.inject, 2),
        "last_failure_s": round(last - phase.inject, 2),
        "clean_from_s": None if after is None else round(float(after["t0"]) - phase.inject, 2),
    }


def recovery_table(phases: Sequence[Phase], recoveries: Mapping[str, Mapping[str, Any]]) -> str:
    """Per phase: how long chains kept failing after the fault, and whether it healed."""
    lines = [
        "| phase | chains | failed | first failure | last failure | clean from "
        "| healthy after the windows | then |",
        "|---|--:|--:|--:|--:|--:|--:|---|",
    ]

    def at(value: float | None) -> str:
        return "-" if value is None else f"{value:+.1f} s"

    for p in phases:
        if not p.windows:
            continue
        r = recoveries[p.name]
        clean = at(r["clean_from_s"]) if r["clean_from_s"] is not None else "not recovered"
        if p.settled_s is None:
            healthy = "no"
        else:
            healthy = "yes" if p.settled_s < 0.5 else f"{p.settled_s:.1f} s later"
        then = "every process restarted" if p.reset else "-"
        lines.append(
            f"| {p.name} | {r['chains']} | {r['failed']} | {at(r['first_failure_s'])} "
            f"| {at(r['last_failure_s'])} | {clean} | {healthy} | {then} |"
        )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def phase_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The markdown table of one phase's windows."""
    lines = [
        "| window | requests | sent | ok | failed | retried | duplicated | p50 ms | p99 ms |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        dup = str(r["duplicated"]) if r["class"] == "POST /chain" else "n/a"
        lines.append(
            f"| {r['window']} ({r['seconds']:.0f} s) | {r['class']} | {r['sent']} | {r['ok']} "
            f"| {r['failed']} | {r['retried']} | {dup} | {_ms(r['p50_ms'])} | {_ms(r['p99_ms'])} |"
        )
    failures = [(r, reason, n) for r in rows for reason, n in r["failed_by_reason"].items()]
    if failures:
        lines.append("")
        lines.append("Failures by reason:")
        for r, reason, n in failures:
            lines.append(f"- {r['window']}, {r['class']}: {n} x `{reason}`")
    retried = [r for r in rows if r["retried"]]
    if retried:
        lines.append("")
        lines.append("Retries:")
        for r in retried:
            parts = []
            if r["retried_by_transport"]:
                parts.append(f"{r['retried_by_transport']} by the client's transport")
            if r["retried_by_transport_in_orchestrator"]:
                n = r["retried_by_transport_in_orchestrator"]
                parts.append(f"{n} stage calls re-sent by the orchestrator's transport")
            if r["retried_by_client"]:
                parts.append(f"{r['retried_by_client']} by the client (idempotent GETs)")
            lines.append(f"- {r['window']}, {r['class']}: " + ", ".join(parts))
    began = [r for r in rows if r["failed_after_server_began"]]
    if began:
        lines.append("")
        for r in began:
            lines.append(
                f"- {r['window']}, {r['class']}: {r['failed_after_server_began']} failed chains "
                "had been begun by the orchestrator (outcome unknown to the client; "
                "not retried, so not duplicated)"
            )
    return "\n".join(lines)


def summary_table(results: Sequence[Mapping[str, Any]]) -> str:
    """One line per phase and window, POST /chain only: the soak at a glance."""
    lines = [
        "| phase | window | chains sent | ok | failed | retried | duplicated | p50 ms | p99 ms |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        if r["class"] != "POST /chain":
            continue
        lines.append(
            f"| {r['phase']} | {r['window']} | {r['sent']} | {r['ok']} | {r['failed']} "
            f"| {r['retried']} | {r['duplicated']} | {_ms(r['p50_ms'])} | {_ms(r['p99_ms'])} |"
        )
    return "\n".join(lines)


def service_table(per_service: Mapping[str, Mapping[str, int]]) -> str:
    lines = [
        "| service | POSTs executed | distinct ids | duplicated ids | GETs executed "
        "| GET ids re-executed |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for role, d in per_service.items():
        lines.append(
            f"| {role} | {d['post_executions']} | {d['post_ids']} | {d['duplicated_ids']} "
            f"| {d['get_executions']} | {d['get_reexecuted_ids']} |"
        )
    return "\n".join(lines)
