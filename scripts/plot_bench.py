#!/usr/bin/env python3
"""Draws the SVG charts BENCHMARKS.md embeds from `copilot-ingest bench --plots DIR`.

usage: python3 scripts/plot_bench.py DIR [CHANGES_CSV]

- DIR/drain_<sink>.csv (seconds, written) and DIR/limits.csv: each drain's
  throughput over time (1 s windows) against its sink's raw limits;
- DIR/latency.csv: end-to-end p50 and p99 against the offered load;
- CHANGES_CSV (change, before, after, unit), when given: one pair of bars per
  change, before and after.

Needs matplotlib (`pip install matplotlib`); writes DIR/*.svg.
"""
import csv
import pathlib
import sys

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def drain_chart(out, sink, samples, limits):
    # Throughput in 1 s windows from the cumulative count.
    times, rates = [], []
    window_start = 0
    for i, (t, written) in enumerate(samples):
        t0, w0 = samples[window_start]
        if t - t0 >= 1.0:
            times.append(t)
            rates.append((written - w0) / (t - t0))
            window_start = i
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.plot(times, rates, label=f"copilot-ingest → {sink}", color="#1f77b4")
    styles = ["--", ":", "-."]
    for k, limit in enumerate(limits):
        ax.axhline(float(limit["events_per_s"]), linestyle=styles[k % 3], color="#555", label=limit["name"])
    ax.set_xlabel("seconds since the first event")
    ax.set_ylabel("records written per second")
    total = int(samples[-1][1]) if samples else 0
    ax.set_title(f"Draining {total:,} events into {sink}")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / f"drain_{sink}.svg")
    plt.close(fig)


def latency_chart(out, points):
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for sink in sorted({p["sink"] for p in points}):
        mine = sorted((p for p in points if p["sink"] == sink), key=lambda p: int(p["offered_events_per_s"]))
        load = [int(p["offered_events_per_s"]) for p in mine]
        ax.plot(load, [float(p["p50_ms"]) for p in mine], marker="o", label=f"{sink} p50")
        ax.plot(load, [float(p["p99_ms"]) for p in mine], marker="s", linestyle="--", label=f"{sink} p99")
    ax.axhline(1000, color="#c00", linewidth=0.8, label="goal: p99 < 1 s")
    ax.set_xlabel("offered load (events/s)")
    ax.set_ylabel("end to end (ms, log scale)")
    ax.set_yscale("log")
    ax.set_title("End-to-end latency against offered load")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency.svg")
    plt.close(fig)


def changes_chart(out, changes):
    # One row per change, each on its own scale (the units differ).
    fig, axes = plt.subplots(len(changes), 1, figsize=(8, 1.1 * len(changes)), squeeze=False)
    for ax, c in zip(axes[:, 0], changes):
        before, after = float(c["before"]), float(c["after"])
        ax.barh([1, 0], [before, after], color=["#bbb", "#1f77b4"], height=0.6)
        ax.set_yticks([1, 0], ["before", "after"], fontsize=7)
        ax.set_title(f"{c['change']} ({c['unit']})", fontsize=8, loc="left")
        for y, v in ((1, before), (0, after)):
            ax.text(v, y, f" {v:,.1f}".rstrip("0").rstrip("."), va="center", fontsize=7)
        ax.set_xlim(0, max(before, after) * 1.25)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "changes.svg")
    plt.close(fig)


def main():
    out = pathlib.Path(sys.argv[1])
    limits = rows(out / "limits.csv")
    for drain in sorted(out.glob("drain_*.csv")):
        sink = drain.stem.removeprefix("drain_")
        samples = [(float(r["seconds"]), float(r["written"])) for r in rows(drain)]
        # The sink's own limits: the consume limit is far above and would flatten the chart.
        mine = [l for l in limits if l["sink"] == sink]
        drain_chart(out, sink, samples, mine)
    if (out / "latency.csv").exists() and rows(out / "latency.csv"):
        latency_chart(out, rows(out / "latency.csv"))
    if len(sys.argv) > 2:
        changes_chart(out, rows(sys.argv[2]))


if __name__ == "__main__":
    main()
