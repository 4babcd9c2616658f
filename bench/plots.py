"""PNG plots of a benchmark run, for a person to look at: throughput bars per system,
latency CDFs, and the workload-specific comparisons (short requests' TTFT with and without
long ones; the prefix cache's hit rate and its effect on throughput)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

COLORS = {"Conveyor": "#1f77b4", "static batching (HF)": "#ff7f0e", "no batching (HF)": "#7f7f7f"}


def _bars(ax, labels: list[str], values: list[float], title: str, fmt: str = "{:.1f}", colors=None) -> None:
    colors = colors or [_color(lbl, "#2ca02c") for lbl in labels]
    bars = ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), [textwrap.fill(lbl, 22) for lbl in labels], fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.bar_label(bars, [fmt.format(v) for v in values], fontsize=8)
    ax.margins(y=0.15)


def _color(label: str, default=None):
    return next((c for name, c in COLORS.items() if label.startswith(name)), default)


def throughput(systems: dict[str, dict], title: str, path: Path) -> None:
    """`systems`: label → summary (as metrics.summarize returns)."""
    labels = list(systems)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    _bars(axes[0], labels, [s["output_throughput"] for s in systems.values()], "output tokens / s", "{:.0f}")
    _bars(axes[1], labels, [s["request_throughput"] for s in systems.values()], "requests / s", "{:.2f}")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_cdfs(values: dict[str, dict[str, np.ndarray]], title: str, path: Path) -> None:
    """`values`: label → {"ttft": seconds, "e2e": seconds, ...} (metrics.latency_values)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in ((axes[0], "ttft", "time to first token"), (axes[1], "e2e", "end-to-end latency")):
        for label, v in values.items():
            x = np.sort(np.asarray(v[key]))
            if len(x) == 0:
                continue
            y = np.arange(1, len(x) + 1) / len(x)
            ax.step(x, y, where="post", label=label, color=_color(label))
        ax.set_xscale("log")
        ax.set_xlabel("seconds (log scale)")
        ax.set_ylabel("share of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def short_ttft(rows: dict[str, dict[str, float]], title: str, path: Path) -> None:
    """`rows`: label ("Conveyor — with long", ...) → {"p50": ms, "p99": ms}."""
    labels = list(rows)
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(6.5, 2.2 * len(labels)), 4.2))
    for k, (p, color) in enumerate((("p50", "#9ecae1"), ("p99", "#08519c"))):
        vals = [rows[lbl][p] for lbl in labels]
        bars = ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, label=f"TTFT {p}", color=color)
        ax.bar_label(bars, [f"{v:.0f}" for v in vals], fontsize=8)
    ax.set_xticks(x, [lbl.replace(" — ", "\n") for lbl in labels], fontsize=8)
    ax.set_yscale("log")  # static batching's waits dwarf continuous batching's
    ax.set_ylabel("ms (log scale)")
    ax.legend(fontsize=8)
    ax.set_ylim(top=ax.get_ylim()[1] * 3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prefix_cache(
    hit_rate: float, ideal: float, throughputs: dict[str, float], title: str, path: Path
) -> None:
    """Measured vs ideal hit rate (left); output tok/s with prefix caching on and off (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    _bars(
        axes[0],
        ["measured", "ideal"],
        [100 * hit_rate, 100 * ideal],
        "prefix-cache hit rate (% of prompt tokens)",
        "{:.1f}%",
        colors=[COLORS["Conveyor"], "#bdbdbd"],
    )
    _bars(
        axes[1],
        list(throughputs),
        list(throughputs.values()),
        "Conveyor output tokens / s",
        "{:.0f}",
        colors=[COLORS["Conveyor"], "#bdbdbd"][: len(throughputs)],
    )
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
