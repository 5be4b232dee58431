"""Coordinator-side metrics: computed at scrape time from a :class:`PodSample`.

The coordinator keeps plain stats (supervisor slots, leader rounds, its probes); this
collector turns a fresh sample of them into metric families, so cumulative counts
(restarts, leader transitions, moves) are exported exactly, without a second copy.
"""

from __future__ import annotations

import sys
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shardworker import __version__
from shardworker.metrics import MOVE_REASONS, PAUSE_REASONS, bounded


@dataclass(frozen=True)
class WorkerSample:
    index: int
    pid: int | None
    ready: bool
    restarts: int
    hung_kills: int


@dataclass(frozen=True)
class ProcessSample:
    """Resource use of one process of the pod (``coordinator`` or ``worker-<i>``)."""

    name: str
    cpu_s: float
    rss_bytes: int
    open_fds: int
    max_fds: int


@dataclass(frozen=True)
class LeaderSample:
    is_leader: bool
    transitions: int
    members: int
    providers: int
    unowned: int
    imbalance: float
    moves: Mapping[str, int]


@dataclass(frozen=True)
class StreamSample:
    length: int
    dead_letter_length: int
    group_lag: Mapping[str, int]
    backlog: int
    max_lag: int


@dataclass(frozen=True)
class PodSample:
    """What the coordinator knows; ``paused`` is None unless it is the leader."""

    workers: Sequence[WorkerSample]
    processes: Sequence[ProcessSample]
    leader: LeaderSample
    stream: StreamSample | None
    paused: Mapping[str, int] | None
    dependencies: Mapping[str, bool]


def _gauge(name: str, doc: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class PodCollector(Collector):
    """Coordinator-side metrics, computed from a fresh :class:`PodSample` per scrape."""

    def __init__(self, sample: Callable[[], PodSample]) -> None:
        self.sample = sample

    def collect(self) -> Iterable[Metric]:
        s = self.sample()
        python = ".".join(map(str, sys.version_info[:3]))
        yield _gauge("shardworker_build_info", "Version of this pod (always 1).", 1,
                     version=__version__, python=python)  # fmt: skip
        yield from _worker_families(s.workers)
        yield from _process_families(s.processes)
        yield from _leadership_families(s.leader)
        if s.stream is not None:
            yield from _stream_families(s.stream)
        if s.paused is not None:
            paused = GaugeMetricFamily(
                "shardworker_providers_paused", "Paused providers by reason (leader only).",
                labels=["reason"],
            )  # fmt: skip
            for reason in PAUSE_REASONS:
                paused.add_metric([reason], s.paused.get(reason, 0))
            yield paused
        up = GaugeMetricFamily(
            "shardworker_dependency_up", "Whether the last probe reached it (1) or not (0).",
            labels=["dependency"],
        )  # fmt: skip
        for name, ok in sorted(s.dependencies.items()):
            up.add_metric([name], 1.0 if ok else 0.0)
        yield up


def _worker_families(workers: Sequence[WorkerSample]) -> Iterator[Metric]:
    by_state = Tally("ready" if w.ready else "starting" if w.pid else "down" for w in workers)
    states = GaugeMetricFamily(
        "shardworker_workers", "Worker processes of this pod by state.", labels=["state"]
    )
    for state in ("ready", "starting", "down"):
        states.add_metric([state], by_state.get(state, 0))
    yield states
    restarts = CounterMetricFamily(
        "shardworker_worker_restarts", "Worker processes restarted, per slot.", labels=["worker"]
    )
    hung = CounterMetricFamily(
        "shardworker_worker_hung_kills",
        "Workers killed for not answering pings, per slot.",
        labels=["worker"],
    )
    for w in workers:
        restarts.add_metric([str(w.index)], w.restarts)
        hung.add_metric([str(w.index)], w.hung_kills)
    yield restarts
    yield hung


def _process_families(processes: Sequence[ProcessSample]) -> Iterator[Metric]:
    specs = (
        ("shardworker_process_resident_memory_bytes", "Resident memory.", "rss_bytes"),
        ("shardworker_process_open_fds", "Open file descriptors (sockets included).", "open_fds"),
        ("shardworker_process_max_fds", "File descriptor limit.", "max_fds"),
    )
    cpu = CounterMetricFamily(
        "shardworker_process_cpu_seconds", "CPU time (user + system).", labels=["process"]
    )
    for p in processes:
        cpu.add_metric([p.name], p.cpu_s)
    yield cpu
    for name, doc, attr in specs:
        family = GaugeMetricFamily(name, doc, labels=["process"])
        for p in processes:
            family.add_metric([p.name], float(getattr(p, attr)))
        yield family


def _leadership_families(leader: LeaderSample) -> Iterator[Metric]:
    yield _gauge("shardworker_is_leader", "1 when this pod leads the pool.", leader.is_leader)
    yield CounterMetricFamily(
        "shardworker_leader_transitions", "Times this pod gained or lost the leadership.",
        value=leader.transitions,
    )  # fmt: skip
    moves = CounterMetricFamily(
        "shardworker_assignment_moves", "Providers moved by this pod's leader rounds.",
        labels=["reason"],
    )  # fmt: skip
    for reason in sorted(set(MOVE_REASONS) | set(leader.moves)):
        moves.add_metric([bounded(reason)], leader.moves.get(reason, 0))
    yield moves
    if not leader.is_leader:
        return
    yield _gauge("shardworker_pool_members", "Live pool members (leader only).", leader.members)
    yield _gauge(
        "shardworker_providers_servable",
        "Active, unpaused providers the pool should serve (leader only).",
        leader.providers,
    )
    yield _gauge(
        "shardworker_providers_unowned",
        "Servable providers assigned to no member (leader only).",
        leader.unowned,
    )
    yield _gauge(
        "shardworker_assignment_imbalance_ratio",
        "Most loaded member's providers over the mean (leader only; 1 is perfect).",
        leader.imbalance,
    )


def _stream_families(stream: StreamSample) -> Iterator[Metric]:
    yield _gauge("shardworker_stream_length", "Entries in workflow:events:global.", stream.length)
    yield _gauge(
        "shardworker_dead_letter_stream_length",
        "Entries in the dead-letter stream.",
        stream.dead_letter_length,
    )
    lag = GaugeMetricFamily(
        "shardworker_stream_consumer_lag",
        "Entries of workflow:events:global a consumer group has not read.",
        labels=["group"],
    )
    for group, value in sorted(stream.group_lag.items()):
        lag.add_metric([group], value)
    yield lag
    yield _gauge(
        "shardworker_backpressure_backlog",
        "Unread entries of the backpressure group (a missing group counts the whole stream).",
        stream.backlog,
    )
    yield _gauge(
        "shardworker_backpressure_max_lag",
        "The backlog above which workers stop fetching (SHARDWORKER_BACKPRESSURE_MAX_LAG).",
        stream.max_lag,
    )
    yield _gauge(
        "shardworker_backpressure_active",
        "1 while the backlog is above the bound and fetching is paused.",
        stream.backlog > stream.max_lag,
    )
