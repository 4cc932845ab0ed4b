"""``simulate --plot FILE.png``: spot capacity, replicas per pool and backlog over time.

Hourly means, so a 30-day run of 30 s steps stays a readable line (matplotlib, Agg).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from spotbatch.scheduler.simulate import Timeline

__all__ = ["plot_timelines"]

_BIN_S = 3600.0


def plot_timelines(path: str | Path, runs: Sequence[tuple[str, Timeline]], *, title: str) -> Path:
    """Three panels sharing the time axis (days): the spot capacity the market offered,
    each policy's replicas per pool (on-demand solid, spot dashed), each policy's backlog."""
    import matplotlib

    matplotlib.use("Agg")  # no display here or in CI
    import matplotlib.pyplot as plt

    fig, (ax_cap, ax_rep, ax_back) = plt.subplots(3, 1, sharex=True, figsize=(10, 8))
    first = runs[0][1]
    if first.spot_capacity is not None:
        ax_cap.step(*_hourly(first.spot_capacity, first.step_s), where="post", color="tab:green")
    else:
        ax_cap.text(0.5, 0.5, "synthetic market (no spot trace)", transform=ax_cap.transAxes, ha="center")
    for k, (name, tl) in enumerate(runs):
        color = f"C{k}"
        ax_rep.plot(*_hourly(tl.on_demand, tl.step_s), color=color, label=f"{name}: on-demand")
        ax_rep.plot(*_hourly(tl.spot, tl.step_s), color=color, linestyle="--", label=f"{name}: spot")
        ax_back.plot(*_hourly(tl.backlog_rows, tl.step_s), color=color, label=name)
    ax_cap.set_ylabel("spot capacity\n(replicas, all zones)")
    ax_rep.set_ylabel("replicas alive\n(hourly mean)")
    ax_back.set_ylabel("backlog rows\n(hourly mean)")
    ax_back.set_xlabel("day")
    ax_rep.legend(fontsize=6, ncol=2, loc="upper right")
    ax_back.legend(fontsize=6, loc="upper right")
    ax_cap.set_title(title.replace("$", r"\$"), fontsize=9)  # "$" would start mathtext
    out = Path(path)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _hourly(values: np.ndarray, step_s: float) -> tuple[np.ndarray, np.ndarray]:
    per = max(1, int(round(_BIN_S / step_s)))
    n = len(values) // per * per
    if n == 0:
        return np.arange(len(values)) * step_s / 86_400, np.asarray(values, dtype=float)
    means = np.asarray(values[:n], dtype=float).reshape(-1, per).mean(axis=1)
    return np.arange(len(means)) * per * step_s / 86_400, means
