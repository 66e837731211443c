"""How ``lynx-bench`` shows its results: one row per backend, as a text table and a bar chart."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate


@dataclass
class Row:
    """One backend's measurements (None: not measured); the JSON result holds them as they are."""

    backend: str
    status: str = "ok"
    latency_ms: float | None = None
    round_latency_ms: list[float] | None = None
    """With ``--rounds`` > 1: the median latency of each round; ``latency_ms`` is their median."""
    compile_s: float | None = None
    peak_mem_gib: float | None = None
    rel_error: float | None = None
    linear_time_share: float | None = None
    sampling_s: float | None = None
    """Seconds of the ``--steps`` sampling loop (under the step schedule, if any, for lynx backends)."""
    step_schedule: str | None = None
    """With a step schedule, on lynx backends: how many of the sampling steps ran sparse (``20/25``)."""
    dense_step_ms: float | None = None
    """With a step schedule, on lynx backends: latency of a dense step (the dense twins)."""
    sparse_layers: str | None = None
    error: str | None = None


BASELINES = ("inductor", "inductor-reduce-overhead")
"""The backends speedups are taken against, the first one timed."""


def _speedups(rows: list[Row]) -> tuple[str, dict[str, float]]:
    """(the baseline's name, each timed backend's speedup against it); no speedups when no baseline was timed."""
    timed = {r.backend: r.latency_ms for r in rows if r.latency_ms}
    base = next((name for name in BASELINES if name in timed), BASELINES[0])
    return base, {name: timed[base] / latency for name, latency in timed.items()} if base in timed else {}


def _latency(row: Row) -> str:
    if row.latency_ms is None:
        return "-"
    if row.round_latency_ms:
        return f"{row.latency_ms:.2f} ({min(row.round_latency_ms):.2f}-{max(row.round_latency_ms):.2f})"
    return f"{row.latency_ms:.2f}"


def table(rows: list[Row]) -> str:
    base, speedups = _speedups(rows)
    fmt = lambda v, f: "-" if v is None else format(v, f)
    scheduled = any(r.step_schedule for r in rows)  # the step-schedule columns only where one ran
    out = []
    for r in rows:
        speedup = f"{speedups[r.backend]:.2f}x" if r.backend in speedups else "-"
        sampling = (r.step_schedule or "-", fmt(r.dense_step_ms, ".2f")) if scheduled else ()
        out.append((r.backend, r.status if r.status == "ok" else f"FAILED: {r.error}", _latency(r), speedup,
                    fmt(r.compile_s, ".1f"), fmt(r.peak_mem_gib, ".2f"), fmt(r.rel_error, ".2e"),
                    fmt(r.linear_time_share, ".0%"), fmt(r.sampling_s, ".2f"), *sampling, r.sparse_layers or "-"))
    latency = "latency ms (round range)" if any(r.round_latency_ms for r in rows) else "latency ms"
    headers = ("backend", "status", latency, f"vs {base}", "compile s", "peak GiB", "rel err vs eager",
               "linear share", "sampling s", *(("steps sparse", "dense step ms") if scheduled else ()), "sparse layers")
    return tabulate(out, headers=headers)


def chart(rows: list[Row], title: str) -> Any:
    """A matplotlib figure: one bar per backend with its latency and speedup against the baseline;
    failed backends keep their place, marked FAILED. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, speedups = _speedups(rows)
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
    latencies = [r.latency_ms or 0.0 for r in rows]
    colors = ["tab:red" if r.status != "ok" else "tab:orange" if r.backend.startswith("lynx") else "tab:gray" for r in rows]
    spreads = [[r.latency_ms - min(r.round_latency_ms) if r.round_latency_ms else 0.0 for r in rows],
               [max(r.round_latency_ms) - r.latency_ms if r.round_latency_ms else 0.0 for r in rows]]
    has_spread = any(r.round_latency_ms for r in rows)
    ax.barh([r.backend for r in rows], latencies, color=colors, xerr=spreads if has_spread else None, capsize=3)
    for y, r in enumerate(rows):
        if r.status != "ok":
            text = f"FAILED: {r.error or ''}"[:60]
        else:
            text = f"{r.latency_ms:.2f} ms" + (f", {speedups[r.backend]:.2f}x vs {base}" if r.backend in speedups else "")
        ax.annotate(text, (latencies[y] + spreads[1][y], y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=8,
                    color="tab:red" if r.status != "ok" else "black")
    ax.invert_yaxis()
    longest = max([latency + upper for latency, upper in zip(latencies, spreads[1])] + [1e-9])
    ax.set_xlim(0, 1.45 * longest)  # room for the labels right of the longest bar
    ax.set_xlabel("forward latency (ms, median" + (" of round medians; whiskers: round range)" if has_spread else ")"))
    ax.set_title(title)
    fig.tight_layout()
    return fig


def bar_chart(rows: list[Row], path: Path, title: str) -> bool:
    """Save ``chart`` as an image; False when matplotlib is not installed."""
    try:
        fig = chart(rows, title)
    except ImportError:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
