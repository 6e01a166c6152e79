"""A PNG timeline of a probe run (matplotlib, Agg backend: no display needed).

One panel per client; x = time relative to the pause start (ms; the first send without a
pause), y = one-way latency client -> target (ms). Delivered packets are dots at their
delivery time, duplicates orange diamonds at the time of the extra copy, lost packets red
crosses at their send time on the panel's floor. The pause is shaded, the downtime gap drawn
as a bar.
"""

from __future__ import annotations

from pathlib import Path

from ferry.probe.records import ProbeData
from ferry.probe.report import build_report, first_deliveries


def plot_timeline(data: ProbeData, path: Path | str, pause: tuple[int, int] | None = None,
                  xlim_ms: tuple[float, float] | None = None, title: str | None = None,
                  around_ms: float = 1000.0) -> Path:
    """Write the timeline PNG to ``path`` and return it. ``xlim_ms`` zooms in (relative to the
    pause start)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not data.clients:
        raise ValueError("no clients in the probe data: nothing to plot")
    report = build_report(data, pause, around_ms)
    starts = [c.sent[0][1] for c in data.clients if c.sent]
    t0 = pause[0] if pause is not None else min(starts, default=0)

    def rel(t: int) -> float:
        return (t - t0) / 1e6

    n = len(data.clients)
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.8 * n + 0.6), sharex=True, squeeze=False)
    for ax, cd, cr in zip(axes[:, 0], data.clients, report.clients, strict=True):
        firsts, _, _ = first_deliveries(cd)
        got = {seq for seq, _, _ in firsts}
        xs = [rel(t_rx) for _, _, t_rx in firsts]
        ys = [(t_rx - t_send) / 1e6 for _, t_send, t_rx in firsts]
        first_idx: dict[int, int] = {}
        for i, (seq, _, t_rx) in enumerate(cd.delivered):
            if seq not in first_idx or (t_rx, i) < (cd.delivered[first_idx[seq]][2],
                                                    first_idx[seq]):
                first_idx[seq] = i
        dups = [d for i, d in enumerate(cd.delivered) if first_idx[d[0]] != i]
        lost = [rel(t) for seq, t, _ in cd.sent if seq not in got]
        ax.scatter(xs, ys, s=4, color="tab:blue", label=f"delivered ({cr.delivered})")
        if dups:
            ax.scatter([rel(t) for _, _, t in dups], [(t - ts) / 1e6 for _, ts, t in dups],
                       s=22, marker="D", color="tab:orange", label=f"duplicate ({len(dups)})")
        if lost:
            ax.scatter(lost, [0.0] * len(lost), s=14, marker="x", color="tab:red",
                       label=f"lost, at send time ({len(lost)})")
        if pause is not None:
            ax.axvspan(0.0, rel(pause[1]), color="0.85", zorder=0,
                       label=f"pause ({(pause[1] - pause[0]) / 1e6:.1f} ms)")
        if cr.downtime is not None:
            gap = cr.downtime
            ax.axvline(rel(gap.start_ns), color="tab:purple", lw=0.8, ls="--")
            ax.axvline(rel(gap.end_ns), color="tab:purple", lw=0.8, ls="--",
                       label=f"downtime {gap.ms:.2f} ms" + ("" if gap.recovered else " (open)"))
        ax.set_ylabel("one-way latency (ms)")
        ax.set_title(f"{cd.name} -> {data.target}: sent {cr.sent}, lost {cr.lost}, "
                     f"dup {cr.duplicated}, reordered {cr.reordered}", fontsize=9)
        ax.set_ylim(bottom=-0.05 * max([0.1, *ys]))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=7)
    bottom = axes[-1, 0]
    bottom.set_xlabel("time relative to the pause start (ms)" if pause is not None
                      else "time since the first send (ms)")
    if xlim_ms is not None:
        bottom.set_xlim(*xlim_ms)
    fig.suptitle(title or f"probe at {data.rate_hz:g} Hz to {data.target}", fontsize=11)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
