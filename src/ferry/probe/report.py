"""What a probe run saw: loss, duplicates, reordering and downtime around a pause.

Definitions (per client; the target VM is what moves, so delivery *to the target* counts):

- ``sent``: packets the client sent (successful ``sendto``);
- ``delivered``: distinct sequence numbers the target received;
- ``echoed``: distinct sequence numbers whose echo came back to the client;
- ``lost``: sent but never delivered to the target;
- ``duplicated``: deliveries beyond the first of a sequence number (a packet delivered twice
  counts once in ``delivered`` and once here);
- ``reordered``: first deliveries whose sequence number is lower than one delivered before
  (a duplicate is never also counted as reordered);
- ``downtime``: the longest gap between consecutive first deliveries (in target receive time)
  that overlaps ``[pause start - around, pause end + around]`` (the whole run without a
  pause), cut at ``until`` when given (to leave out a later event reported on its own). It
  runs from the last delivery before to the first delivery after; when nothing was delivered
  after it, the gap ends at the client's last send and ``recovered`` is false.
  At rate R the gap is at least 1/R even without loss.
- ``downtime_beyond_pause_ms`` = downtime - pause duration.

Overall figures add the counts up; the overall downtime is the worst client's.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ferry.probe.records import ClientData, ProbeData

NS_PER_MS = 1_000_000


@dataclass(frozen=True)
class Gap:
    """A gap in delivery to the target; times in CLOCK_MONOTONIC ns."""

    start_ns: int  # last delivery before the gap (or the first send)
    end_ns: int  # first delivery after it (or the last send if it never recovered)
    recovered: bool
    lost: int  # packets sent within the gap and never delivered

    @property
    def ms(self) -> float:
        return (self.end_ns - self.start_ns) / NS_PER_MS


@dataclass
class ClientReport:
    name: str
    probe_id: int
    sent: int = 0
    delivered: int = 0
    echoed: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    send_errors: int = 0
    skipped_slots: int = 0
    achieved_rate_hz: float = 0.0
    send_late_p99_us: float = 0.0
    latency_p50_us: float = 0.0  # one way, client -> target
    latency_p99_us: float = 0.0
    latency_max_us: float = 0.0
    jitter_us: float = 0.0  # mean |difference| of consecutive one-way latencies (RFC 3550)
    rtt_p50_us: float = 0.0
    downtime: Gap | None = None
    downtime_ms: float | None = None
    downtime_beyond_pause_ms: float | None = None
    # The longest delay of the client's own sending (behind its 1 kHz schedule) among packets
    # it sent within the downtime gap: part of the gap is then the instrument's, not the
    # network's (a starved client sends late).
    send_late_in_gap_ms: float | None = None


@dataclass
class ProbeReport:
    target: str
    rate_hz: float
    pause_start_ns: int | None
    pause_end_ns: int | None
    pause_ms: float | None
    clients: list[ClientReport]
    total: ClientReport = field(init=False)

    def __post_init__(self) -> None:
        self.total = _total(self.clients)

    @property
    def downtime_ms(self) -> float | None:
        return self.total.downtime_ms

    @property
    def downtime_beyond_pause_ms(self) -> float | None:
        return self.total.downtime_beyond_pause_ms

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = _rounded(asdict(self))
        return data

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> Any:
        """A :class:`rich.table.Table` of the figures, one row per client plus the total."""
        from rich.table import Table

        pause = f", pause {self.pause_ms:.1f} ms" if self.pause_ms is not None else ""
        table = Table(title=f"probe -> {self.target} at {self.rate_hz:g} Hz{pause}")
        for col in ("client", "sent", "deliv.", "echoed", "lost", "dup", "reord", "rate Hz",
                    "lat p50/p99 µs", "jitter µs", "downtime ms", "beyond pause ms"):
            table.add_column(col, justify="left" if col == "client" else "right")
        for r in [*self.clients, self.total]:
            table.add_row(
                r.name, str(r.sent), str(r.delivered), str(r.echoed), str(r.lost),
                str(r.duplicated), str(r.reordered), f"{r.achieved_rate_hz:.1f}",
                f"{r.latency_p50_us:.0f}/{r.latency_p99_us:.0f}", f"{r.jitter_us:.1f}",
                _fmt(r.downtime_ms) + ("" if r.downtime is None or r.downtime.recovered
                                       else " (no recovery)"),
                _fmt(r.downtime_beyond_pause_ms))
        return table

    def to_text(self, width: int = 140) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=width, color_system=None).print(self.table())
        return buf.getvalue()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 3) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def first_deliveries(cd: ClientData) -> tuple[list[tuple[int, int, int]], int, int]:
    """(first deliveries in receive order, duplicates, reordered) of one client."""
    order = sorted(range(len(cd.delivered)), key=lambda i: (cd.delivered[i][2], i))
    seen: set[int] = set()
    firsts: list[tuple[int, int, int]] = []
    dups = reordered = 0
    highest = -1
    for i in order:
        seq = cd.delivered[i][0]
        if seq in seen:
            dups += 1
            continue
        seen.add(seq)
        if seq < highest:
            reordered += 1
        highest = max(highest, seq)
        firsts.append(cd.delivered[i])
    return firsts, dups, reordered


def find_downtime(cd: ClientData, firsts: Sequence[tuple[int, int, int]],
                  window: tuple[int, int] | None) -> Gap | None:
    """The longest delivery gap overlapping ``window`` (anywhere if None)."""
    if not cd.sent:
        return None
    times = [t_rx for _, _, t_rx in firsts]
    first_send, last_send = cd.sent[0][1], cd.sent[-1][1]
    lo, hi = window if window is not None else (first_send, last_send)
    # nothing delivered before the window: the gap starts with the first send
    edges = times if times and times[0] <= lo else [min(first_send, *times[:1]), *times]
    best: tuple[int, int, bool] | None = None
    for a, b in itertools.pairwise(edges):
        if b >= lo and a <= hi and (best is None or b - a > best[1] - best[0]):
            best = (a, b, True)
    if last_send > edges[-1] and last_send >= lo and (
            best is None or last_send - edges[-1] > best[1] - best[0]):
        best = (edges[-1], last_send, False)  # nothing delivered after edges[-1]
    if best is None:
        return None
    a, b, recovered = best
    delivered = {seq for seq, _, _ in firsts}
    lost = sum(1 for seq, t, _ in cd.sent if a <= t <= b and seq not in delivered)
    return Gap(a, b, recovered, lost)


def downtime_window(pause: tuple[int, int], around_ns: int) -> tuple[int, int]:
    """Where a client's downtime is searched: the pause and ``around_ns`` on each side."""
    return pause[0] - around_ns, pause[1] + around_ns


def client_report(cd: ClientData, pause: tuple[int, int] | None,
                  around_ns: int, until_ns: int | None = None) -> ClientReport:
    r = ClientReport(cd.name, cd.probe_id)
    firsts, r.duplicated, r.reordered = first_deliveries(cd)
    sent_seqs = {seq for seq, _, _ in cd.sent}
    delivered = {seq for seq, _, _ in firsts}
    r.sent = len(sent_seqs)
    r.delivered = len(delivered)
    r.echoed = len({seq for seq, _, _ in cd.echoed})
    r.lost = len(sent_seqs - delivered)
    r.send_errors = int(cd.meta.get("send_errors", 0))
    r.skipped_slots = int(cd.meta.get("skipped_slots", 0))
    if len(cd.sent) > 1:
        span = cd.sent[-1][1] - cd.sent[0][1]
        r.achieved_rate_hz = (len(cd.sent) - 1) * 1e9 / span if span > 0 else 0.0
    r.send_late_p99_us = _pct([late / 1e3 for _, _, late in cd.sent], 0.99)
    lat = [(t_rx - t_send) / 1e3 for _, t_send, t_rx in firsts]
    if lat:
        r.latency_p50_us = statistics.median(lat)
        r.latency_p99_us = _pct(lat, 0.99)
        r.latency_max_us = max(lat)
    if len(lat) > 1:
        r.jitter_us = statistics.fmean(abs(b - a) for a, b in itertools.pairwise(lat))
    rtt = [(t_back - t_send) / 1e3 for _, t_send, t_back in cd.echoed]
    r.rtt_p50_us = statistics.median(rtt) if rtt else 0.0
    window = None if pause is None else downtime_window(pause, around_ns)
    if window is not None and until_ns is not None:
        window = (window[0], max(pause[1], min(window[1], until_ns)))  # type: ignore[index]
    r.downtime = find_downtime(cd, firsts, window)
    if r.downtime is not None:
        r.downtime_ms = r.downtime.ms
        gap = r.downtime
        r.send_late_in_gap_ms = max((late / NS_PER_MS for _, t, late in cd.sent
                                     if gap.start_ns <= t <= gap.end_ns), default=0.0)
        if pause is not None:
            r.downtime_beyond_pause_ms = r.downtime.ms - (pause[1] - pause[0]) / NS_PER_MS
    return r


def _total(clients: Sequence[ClientReport]) -> ClientReport:
    t = ClientReport("total", 0)
    for c in clients:
        for name in ("sent", "delivered", "echoed", "lost", "duplicated", "reordered",
                     "send_errors", "skipped_slots"):
            setattr(t, name, getattr(t, name) + getattr(c, name))
        t.achieved_rate_hz += c.achieved_rate_hz
    if clients:
        t.send_late_p99_us = max(c.send_late_p99_us for c in clients)
        t.latency_p50_us = statistics.median(c.latency_p50_us for c in clients)
        t.latency_p99_us = max(c.latency_p99_us for c in clients)
        t.latency_max_us = max(c.latency_max_us for c in clients)
        t.jitter_us = max(c.jitter_us for c in clients)
        t.rtt_p50_us = statistics.median(c.rtt_p50_us for c in clients)
    gaps = [(not c.downtime.recovered, c.downtime.ms, i)
            for i, c in enumerate(clients) if c.downtime is not None]
    if gaps:
        worst = clients[max(gaps)[2]]
        t.downtime, t.downtime_ms = worst.downtime, worst.downtime_ms
        t.downtime_beyond_pause_ms = worst.downtime_beyond_pause_ms
        t.send_late_in_gap_ms = worst.send_late_in_gap_ms
    return t


def build_report(data: ProbeData, pause: tuple[int, int] | None = None,
                 around_ms: float = 1000.0, until_ns: int | None = None) -> ProbeReport:
    """The report of a run; ``pause`` = (start, end) in CLOCK_MONOTONIC ns, as the caller
    measured them (``time.monotonic_ns()``); ``around_ms`` widens the window searched for
    the downtime on both sides of the pause; ``until_ns`` (same clock) ends it earlier."""
    if pause is not None and pause[1] < pause[0]:
        raise ValueError(f"pause ends before it starts: {pause}")
    around = int(around_ms * NS_PER_MS)
    clients = [client_report(cd, pause, around, until_ns) for cd in data.clients]
    pause_ms = None if pause is None else (pause[1] - pause[0]) / NS_PER_MS
    return ProbeReport(target=data.target, rate_hz=data.rate_hz,
                       pause_start_ns=None if pause is None else pause[0],
                       pause_end_ns=None if pause is None else pause[1],
                       pause_ms=pause_ms, clients=clients)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ferry.probe.report DIR [--pause START_NS END_NS] [--json] [--plot PNG]``"""
    import argparse

    from ferry.probe.records import load

    p = argparse.ArgumentParser(prog="python -m ferry.probe.report",
                                description="Report of a probe run directory.")
    p.add_argument("dir")
    p.add_argument("--pause", nargs=2, type=int, metavar=("START_NS", "END_NS"))
    p.add_argument("--around-ms", type=float, default=1000.0)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.add_argument("--plot", help="also write the timeline PNG here")
    args = p.parse_args(argv)
    data = load(args.dir)
    pause: tuple[int, int] | None = (args.pause[0], args.pause[1]) if args.pause else None
    report = build_report(data, pause, args.around_ms)
    print(report.to_json() if args.json else report.to_text())
    if args.plot:
        from ferry.probe.plot import plot_timeline

        plot_timeline(data, args.plot, pause, around_ms=args.around_ms)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
