"""Markdown tables of a gateway benchmark run (``results.json`` of ``gateway_bench.py``).

Also runs on its own, to re-render a finished run:

    .venv/bin/python perf_analyzer/gateway_report.py perf_analyzer/results/<run>/results.json
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: p99 bound of the issue's latency goal, and the rate it asks for
GOAL_P99_MS = 20.0
GOAL_RATE = 2000
GOAL_RATIO = 0.6

Row = dict[str, Any]


def _median(values: Iterable[Any]) -> Any:
    vals = [v for v in values if isinstance(v, int | float)]
    return statistics.median(vals) if vals else None


def aggregate(records: list[Row]) -> list[Row]:
    """One row per step (median over repetitions of every number), profiled steps apart."""
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for r in records:
        if r["kind"] == "client_cost":
            continue
        key = (r["kind"], r.get("workers"), r["mode"], r.get("rate"), r.get("concurrency"))
        key += (r.get("variant"), "profile" in r)
        groups.setdefault(key, []).append(r)
    rows = []
    for (kind, workers, mode, rate, conc, variant, profiled), recs in groups.items():
        summaries = [r["summary"] for r in recs]
        cpus = [r["cpu"] for r in recs]
        row: Row = {
            "kind": kind,
            "workers": workers,
            "mode": mode,
            "rate": rate,
            "concurrency": conc,
            "variant": variant,
            "profiled": profiled,
            "reps": len(recs),
            "loadavg": [r["loadavg"] for r in recs],
        }
        for k in {k for s in summaries for k in s}:
            row[k] = _median(s.get(k) for s in summaries)
        row["errors"] = _merge_errors(s.get("errors") or {} for s in summaries)
        row["cpu"] = {k: _median(c.get(k) for c in cpus) for k in {k for c in cpus for k in c}}
        for k in ("gateway_cpu_us_per_req", "triton_cpu_us_per_req"):
            row[k] = _median(r.get(k) for r in recs)
        if profiled:
            row["profile"] = recs[0]["profile"]
        rows.append(row)
    return rows


def _merge_errors(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def sustained(row: Row, p99_ms: float) -> bool:
    """Kept the schedule, answered (nearly) everything un-degraded, p99 within the bound."""
    rate = row["rate"]
    return bool(
        row.get("requests")
        and row["ok_ratio"] >= 0.999
        and row["sent_per_s"] >= 0.95 * rate
        and row["ok_per_s"] >= 0.95 * rate
        and row["p99_ms"] <= p99_ms
    )


def best_rate(rows: list[Row], p99_ms: float) -> int:
    return max((r["rate"] for r in rows if sustained(r, p99_ms)), default=0)


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "—"
    if (isinstance(v, float) and digits == 0) or isinstance(v, int):
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def _bad(row: Row) -> str:
    parts = []
    if row.get("degraded"):
        parts.append(f"{row['degraded']:,.0f} degraded")
    for k, v in sorted(row["errors"].items()):
        parts.append(f"{v:,} x {k}")
    return ", ".join(parts) or "0"


def _rows(rows: list[Row], kind: str, mode: str, workers: int | None = None) -> list[Row]:
    out = [
        r
        for r in rows
        if r["kind"] == kind
        and r["mode"] == mode
        and not r["profiled"]
        and (workers is None or r["workers"] == workers)
    ]
    return sorted(out, key=lambda r: r["rate"] or 0)


def render(meta: dict[str, Any], records: list[Row], slo_p99_ms: float = 100.0) -> str:
    rows = aggregate(records)
    m = meta.get("machine", {})
    out = [
        f"Run {meta.get('started')} → {meta.get('finished')}: {m.get('cores')} cores "
        f"({m.get('cpu')}), {m.get('mem_gb')} GB, kernel {m.get('kernel')}; load average "
        f"{meta.get('loadavg_start')} at start, {meta.get('loadavg_end')} at the end "
        f"(other processes used {meta.get('busy_cores_before_start')} cores just before).",
        "",
        f"Command: `{meta.get('command')}`",
        "",
        *([f"**Run stopped early**: {meta['aborted']}", ""] if meta.get("aborted") else []),
        "Latencies are per request, from each load generator's send to its last response byte; "
        "`ok` = HTTP 200 / gRPC OK and not degraded. CPU columns are cores used during the "
        "step (`other` = load on the box from processes outside this benchmark).",
        "",
        "### Triton direct (perf_analyzer, gRPC)",
        "",
        "| target req/s | achieved ok/s | p50 ms | p99 ms | p99.9 ms | max ms | not ok "
        "| Triton cores | perf_analyzer cores | other cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    triton = _rows(rows, "triton", "rate")
    for r in triton:
        c = r["cpu"]
        out.append(
            f"| {_f(r['rate'])} | {_f(r.get('ok_per_s'), 0)} | {_f(r.get('p50_ms'), 2)} "
            f"| {_f(r.get('p99_ms'), 2)} | {_f(r.get('p99_9_ms'), 2)} | {_f(r.get('max_ms'), 1)} "
            f"| {_bad(r)} | {_f(c.get('triton'), 2)} | {_f(c.get('loadgen'), 2)} "
            f"| {_f(c.get('other'), 2)} |"
        )
    workers = sorted({r["workers"] for r in rows if r["kind"] == "gateway"}, reverse=True)
    for w in workers:
        out += [
            "",
            f"### Gateway, {w} worker{'s' if w > 1 else ''} (vegeta → POST /predict, open loop)",
            "",
            "| target req/s | sent/s | ok/s | p50 ms | p99 ms | p99.9 ms | max ms | not ok "
            "| gateway cores | gateway CPU µs/req | Triton cores | Kafka cores | vegeta cores "
            "| other cores |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in _rows(rows, "gateway", "rate", w):
            c = r["cpu"]
            out.append(
                f"| {_f(r['rate'])} | {_f(r.get('sent_per_s'), 0)} | {_f(r.get('ok_per_s'), 0)} "
                f"| {_f(r.get('p50_ms'), 2)} | {_f(r.get('p99_ms'), 2)} "
                f"| {_f(r.get('p99_9_ms'), 2)} | {_f(r.get('max_ms'), 1)} | {_bad(r)} "
                f"| {_f(c.get('gateway'), 2)} | {_f(r.get('gateway_cpu_us_per_req'), 0)} "
                f"| {_f(c.get('triton'), 2)} | {_f(c.get('kafka'), 2)} "
                f"| {_f(c.get('loadgen'), 2)} | {_f(c.get('other'), 2)} |"
            )
    out += [
        "",
        "### Closed loop (fixed number of requests in flight) and the HTTP stack alone",
        "",
        "| what | in flight / rate | ok/s | p50 ms | p99 ms | p99.9 ms | not ok "
        "| gateway cores | gateway CPU µs/req | Triton cores | other cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    closed = [
        *(("Triton direct (perf_analyzer)", r) for r in _rows(rows, "triton", "closed")),
        *(
            (f"gateway POST /predict, {w} worker(s)", r)
            for w in workers
            for r in _rows(rows, "gateway", "closed", w)
        ),
        *(
            (f"gateway GET /livez, {w} worker(s)", r)
            for w in workers
            for r in [*_rows(rows, "livez", "closed", w), *_rows(rows, "livez", "rate", w)]
        ),
    ]
    for what, r in closed:
        c = r["cpu"]
        load = f"{r['concurrency']} in flight" if r["mode"] == "closed" else f"{r['rate']:,}/s"
        out.append(
            f"| {what} | {load} | {_f(r.get('ok_per_s'), 0)} | {_f(r.get('p50_ms'), 2)} "
            f"| {_f(r.get('p99_ms'), 2)} | {_f(r.get('p99_9_ms'), 2)} | {_bad(r)} "
            f"| {_f(c.get('gateway'), 2)} | {_f(r.get('gateway_cpu_us_per_req'), 0)} "
            f"| {_f(c.get('triton'), 2)} | {_f(c.get('other'), 2)} |"
        )
    out += ["", *derived(rows, workers, slo_p99_ms)]
    out += ablation_section(rows)
    for rec in records:
        if rec["kind"] == "client_cost":
            out += [
                "",
                "### The gateway's Triton client alone (`triton_client_cost.py`, uvloop, no HTTP)",
                "",
                "| calls in flight | calls/s | client CPU µs per call |",
                "|---|---|---|",
                *(
                    f"| {r['concurrency']} | {r['calls_per_s']:,} "
                    f"| {r['client_cpu_us_per_call']:,} |"
                    for r in rec["results"]
                ),
            ]
    for r in rows:
        if r["profiled"]:
            out += ["", *profile_section(r)]
    return "\n".join(out) + "\n"


def delivered(row: Row) -> bool:
    """Kept up with the rate: sent on schedule and ≥ 95% of it answered ok."""
    rate = row["rate"]
    return bool(
        row.get("requests") and row["sent_per_s"] >= 0.95 * rate and row["ok_per_s"] >= 0.95 * rate
    )


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "—"


def derived(rows: list[Row], workers: list[int], slo_p99_ms: float) -> list[str]:
    triton = _rows(rows, "triton", "rate")
    t_best = best_rate(triton, slo_p99_ms)
    t_peak = max((r.get("ok_per_s") or 0 for r in triton), default=0)
    t_closed = next(iter(_rows(rows, "triton", "closed")), None)
    t_closed_ok = (t_closed or {}).get("ok_per_s") or 0
    out = [
        "### Overhead",
        "",
        f"'Sustained' = every request sent on schedule, ≥ 99.9% ok, ok/s ≥ 95% of the target "
        f"and p99 ≤ {slo_p99_ms:g} ms. 'Peak' = the most ok/s of any open-loop step.",
        "",
        f"- Triton direct: sustained up to {t_best:,} req/s; peak {t_peak:,.0f} ok/s"
        + (
            f"; closed loop ({t_closed['concurrency']} in flight) {t_closed_ok:,.0f} ok/s."
            if t_closed
            else "."
        ),
    ]
    by_rate = {r["rate"]: r for r in triton}
    for w in workers:
        gw = _rows(rows, "gateway", "rate", w)
        g_best = best_rate(gw, slo_p99_ms)
        g_peak = max((r.get("ok_per_s") or 0 for r in gw), default=0)
        g_closed = next(iter(_rows(rows, "gateway", "closed", w)), None)
        line = (
            f"- Gateway, {w} worker(s): sustained up to {g_best:,} req/s "
            f"({_ratio(g_best, t_best)} of Triton direct); peak {g_peak:,.0f} ok/s "
            f"({_ratio(g_peak, t_peak)}); p99 ≤ {GOAL_P99_MS:g} ms up to "
            f"{best_rate(gw, GOAL_P99_MS):,} req/s"
        )
        if g_closed:
            g_closed_ok = g_closed.get("ok_per_s") or 0
            line += f"; closed loop {g_closed_ok:,.0f} ok/s ({_ratio(g_closed_ok, t_closed_ok)})"
        out.append(line + ".")
        added = [
            f"{r['rate']:,}/s +{r['p50_ms'] - by_rate[r['rate']]['p50_ms']:.1f} ms p50, "
            f"+{r['p99_ms'] - by_rate[r['rate']]['p99_ms']:.1f} ms p99"
            for r in gw
            if r["rate"] in by_rate and delivered(r) and delivered(by_rate[r["rate"]])
        ]
        if added:
            out.append(f"  Added latency where both kept up: {'; '.join(added)}.")
    return out


def ablation_section(rows: list[Row]) -> list[str]:
    ablations = [r for r in rows if r["kind"] == "ablation"]
    if not ablations:
        return []
    base = next((r for r in ablations if r["variant"] == "as deployed"), ablations[0])
    out = [
        "",
        f"### What each part costs (1 worker, {base['rate']:,} req/s, one setting off at a time)",
        "",
        "| gateway variant | gateway CPU µs/req | vs as deployed | gateway cores | Kafka cores "
        "| ok/s | p50 ms | p99 ms | other cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ablations:
        us, base_us = r.get("gateway_cpu_us_per_req"), base.get("gateway_cpu_us_per_req")
        delta = f"{us - base_us:+,.0f} µs" if us is not None and base_us is not None else "—"
        c = r["cpu"]
        out.append(
            f"| {r['variant']} | {_f(us, 0)} | {delta} | {_f(c.get('gateway'), 2)} "
            f"| {_f(c.get('kafka'), 2)} | {_f(r.get('ok_per_s'), 0)} | {_f(r.get('p50_ms'), 2)} "
            f"| {_f(r.get('p99_ms'), 2)} | {_f(c.get('other'), 2)} |"
        )
    return out


def profile_section(row: Row) -> list[str]:
    prof = row["profile"]
    c = row["cpu"]
    per_req = row.get("gateway_cpu_us_per_req") or 0
    out = [
        f"### Where the gateway's CPU goes (py-spy, {row['workers']} worker(s), "
        f"{row['rate']:,} req/s)",
        "",
        f"Achieved {_f(row.get('ok_per_s'), 0)} ok/s, p99 {_f(row.get('p99_ms'), 2)} ms "
        f"(py-spy running). Cores used: gateway {_f(c.get('gateway'), 2)} "
        f"({per_req:,} µs per request), Triton + stubs "
        f"{_f(c.get('triton'), 2)}, Kafka {_f(c.get('kafka'), 2)}, Redis {_f(c.get('redis'), 2)}, "
        f"PostgreSQL {_f(c.get('postgres'), 2)}, vegeta + py-spy {_f(c.get('loadgen'), 2)}, "
        f"other {_f(c.get('other'), 2)}; machine busy {_f(c.get('busy'), 2)} of 2.",
        "",
        f"{prof.get('samples', 0):,} samples of threads holding the GIL (`py-spy record --gil`, "
        "100 Hz, all workers). On a saturated box a thread also holds the GIL while it waits "
        "for a core, so the samples add up to more than the measured CPU; the shares are "
        "spread over the measured CPU per request. Threads: "
        + ", ".join(f"{k} {v}%" for k, v in prof.get("threads_pct", [])),
        "",
        "| stage | share of GIL samples | ≈ µs of gateway CPU per request |",
        "|---|---|---|",
        *(f"| {k} | {v}% | {v * per_req / 100:,.0f} |" for k, v in prof.get("stages_pct", [])),
        "",
        "Top frames by own time:",
        "",
        "| frame | share |",
        "|---|---|",
        *(f"| `{k}` | {v}% |" for k, v in prof.get("top_self_pct", [])),
    ]
    return out


def main() -> None:
    data = json.loads(Path(sys.argv[1]).read_text())
    slo = float(sys.argv[2]) if len(sys.argv) > 2 else 100.0
    sys.stdout.write(render(data["meta"], data["steps"], slo))


if __name__ == "__main__":
    main()
