#!/usr/bin/env python3
"""Draws the figures of docs/benchmarks.md from the JSON lines of the benches.

Usage (from the repository root):

    cargo build --release
    target/release/auditwal bench e2e  --json > e2e.jsonl
    target/release/auditwal bench load --json > load.jsonl
    python3 docs/plots/plot_bench.py e2e.jsonl load.jsonl      # PNGs into docs/plots/

Needs matplotlib (``pip install matplotlib``; nothing else). Every file named on
the command line is read as JSON lines (``bench --json`` output: one object per
line with ``bench``, ``case``, ``events_per_sec``, ``p50_us``, ``p99_us``,
``p999_us``, ...); lines that are not JSON objects are skipped, so a captured
terminal log works too. When a case appears more than once (several files),
the last one wins. Writes, for the data present:

- ``e2e_latency.png``: p50 / p99 / p99.9 request latency per audit setting at
  the fixed rate (``bench e2e`` cases ``off``, ``async``, ``sampled``,
  ``durable``, ``sync``), log-scale y;
- ``e2e_saturation.png``: requests/s per setting at saturation
  (``*-saturated`` cases), with each one's p99;
- ``load_throughput.png``: the loader's rows/s against the ``psql \\copy``
  ceiling measured in the same run (``bench load`` cases ``loader`` and
  ``psql-copy-binary``).

``--out DIR`` puts the PNGs elsewhere (default: this script's directory).
"""

import argparse
import json
import os
import sys

# Cheapest first: the order the eye reads the cost of each setting in.
E2E_ORDER = ["off", "async", "sampled", "durable", "sync"]
COLORS = {"p50": "#4C72B0", "p99": "#DD8452", "p99.9": "#C44E52"}


def read_lines(paths):
    """Every JSON object of every file, keyed by (bench, case); last one wins."""
    cases = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict) and "bench" in obj and "case" in obj:
                    cases[(obj["bench"], obj["case"])] = obj
    return cases


def thousands():
    from matplotlib.ticker import FuncFormatter
    return FuncFormatter(lambda v, _pos: f"{v:,.0f}")


def fmt_us(v):
    return f"{v / 1000:.1f} ms" if v >= 1000 else f"{v:.0f} µs"


def save(plt, fig, out, name):
    """Writes `fig` as out/name (PNG), closes it and returns the path."""
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_e2e_latency(plt, cases, out):
    rows = [cases[("e2e", m)] for m in E2E_ORDER if ("e2e", m) in cases]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.26
    for k, (label, key) in enumerate([("p50", "p50_us"), ("p99", "p99_us"), ("p99.9", "p999_us")]):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        ys = [r.get(key) or 0 for r in rows]
        bars = ax.bar(xs, ys, width, label=label, color=COLORS[label])
        for b, y in zip(bars, ys):
            if y > 0:
                ax.annotate(fmt_us(y), (b.get_x() + b.get_width() / 2, y),
                            ha="center", va="bottom", fontsize=7, rotation=90,
                            xytext=(0, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    labels = []
    for r in rows:
        ratio = r.get("p99_vs_off")
        labels.append(r["case"] + (f"\np99 ×{ratio:.2f} vs off" if ratio is not None else "\n(baseline)"))
    ax.set_xticklabels(labels)
    ax.set_ylabel("request latency, µs (log scale)")
    rate = rows[0].get("target_rate")
    rounds = rows[0].get("rounds")
    ax.set_title("POST /api/links latency per audit setting"
                 + (f" at {rate:,} req/s (open loop)" if rate else "")
                 + (f", median of {rounds} rounds" if rounds else ""))
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(loc="upper left")
    ymax = max((r.get("p999_us") or 0) for r in rows)
    if ymax > 0:
        ax.set_ylim(top=ymax * 4)
    return save(plt, fig, out, "e2e_latency.png")


def plot_e2e_saturation(plt, cases, out):
    rows = [cases[("e2e", f"{m}-saturated")] for m in E2E_ORDER if ("e2e", f"{m}-saturated") in cases]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    ys = [r["events_per_sec"] for r in rows]
    bars = ax.bar(range(len(rows)), ys, 0.6, color="#55A868")
    for b, r in zip(bars, rows):
        note = f"{r['events_per_sec']:,.0f}/s"
        if r.get("p99_us"):
            note += f"\np99 {fmt_us(r['p99_us'])}"
        if r.get("events_per_fsync"):
            note += f"\n{r['events_per_fsync']:.0f} ev/fsync"
        ax.annotate(note, (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["case"].removesuffix("-saturated") for r in rows])
    ax.set_ylabel("requests/s")
    ax.yaxis.set_major_formatter(thousands())
    conns = rows[0].get("connections")
    ax.set_title("POST /api/links at saturation (closed loop"
                 + (f", {conns} connections)" if conns else ")"))
    ax.set_ylim(top=max(ys) * 1.3 if ys else 1)
    ax.grid(axis="y", alpha=0.3)
    return save(plt, fig, out, "e2e_saturation.png")


def plot_load(plt, cases, out):
    loader = cases.get(("load", "loader"))
    psql = cases.get(("load", "psql-copy-binary"))
    if not loader or not psql:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    names = ["auditwal load\n(WAL → binary COPY)", "psql \\copy\n(pre-encoded file)"]
    ys = [loader["events_per_sec"], psql["events_per_sec"]]
    bars = ax.bar([0, 1], ys, 0.55, color=["#4C72B0", "#8C8C8C"])
    for b, y in zip(bars, ys):
        ax.annotate(f"{y:,.0f} rows/s", (b.get_x() + b.get_width() / 2, y),
                    ha="center", va="bottom", fontsize=9,
                    xytext=(0, 2), textcoords="offset points")
    ax.set_xticks([0, 1])
    ax.set_xticklabels(names)
    ax.set_ylabel("rows/s into audit_events")
    ax.yaxis.set_major_formatter(thousands())
    ratio = loader.get("ratio")
    ax.set_title(f"Loader against the server's ingestion ceiling"
                 + (f"\n{loader['events']:,} events, ratio {ratio:.2f}" if ratio else ""))
    ax.set_ylim(top=max(ys) * 1.2)
    ax.grid(axis="y", alpha=0.3)
    return save(plt, fig, out, "load_throughput.png")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="JSON-lines output of `auditwal bench ... --json`")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                        help="directory for the PNGs (default: docs/plots)")
    args = parser.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_bench.py needs matplotlib: pip install matplotlib")
    cases = read_lines(args.files)
    if not cases:
        sys.exit("no bench JSON lines in " + ", ".join(args.files))
    os.makedirs(args.out, exist_ok=True)
    written = [p for p in (plot_e2e_latency(plt, cases, args.out),
                           plot_e2e_saturation(plt, cases, args.out),
                           plot_load(plt, cases, args.out)) if p]
    if not written:
        sys.exit("nothing to plot: no e2e or load cases found")
    for p in written:
        print(p)


if __name__ == "__main__":
    main()
