"""Shared setup for the ingestion benchmarks: private servers, providers, engine, figures.

Every benchmark owns its servers: a throwaway PostgreSQL database on the local server
(dropped afterwards), a private ``redis-server`` on a free port, and a private Dovecot
from the test harness.  Nothing shared (Redis DB 0, the test databases) is touched.
Run from the repository root:  ``PYTHONPATH=. .venv/bin/python bench/<name>.py``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import quopri
import random
import secrets
import select
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any, TextIO

import imapclient
import psycopg

from shardworker import logs
from shardworker.config import Settings, load_settings
from shardworker.db.migrate import migrate
from shardworker.db.providers import create_provider
from shardworker.db.store import ProviderConfig, open_pool
from shardworker.secrets.crypto import generate_key_setting
from shardworker.secrets.store import SecretStore, secret_name
from shardworker.worker import WorkerContext, build_worker
from tests.harness.dovecot import Dovecot, ImapUser
from tests.harness.net import free_port, wait_for_port
from tests.harness.pg import PG_ADMIN_DSN, create_database, drop_database, dsn_for

STREAM = "workflow:events:global"
BENCH_KEYS = generate_key_setting("bench1")

# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A private redis-server on a free port; yields its base URL (append ``/<db>``)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (scripts/install-deps.sh installs it)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="sw-bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir, "--databases", "16"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def throwaway_database() -> Iterator[str]:
    """A freshly migrated database on the local PostgreSQL, dropped afterwards."""
    name = create_database(PG_ADMIN_DSN, prefix="sw_bench_")
    try:
        dsn = dsn_for(PG_ADMIN_DSN, name)
        migrate(dsn)
        yield dsn
    finally:
        drop_database(name, PG_ADMIN_DSN)


# Each implicit-TLS session stays proxied by an imap-login process, and OpenSSL's buffers
# make that ~100 KiB: under the default 256 MB vsz_limit a login process dies of "OpenSSL
# malloc() failed" near 2,000 TLS sessions.  Benchmarks hold thousands of them.
MANY_TLS_SESSIONS_CONF = """\
service imap-login {
  vsz_limit = 4G
  process_min_avail = 4
}
"""


@contextlib.contextmanager
def private_dovecot(extra_conf: str = MANY_TLS_SESSIONS_CONF) -> Iterator[Dovecot]:
    server = Dovecot(extra_conf=extra_conf)
    try:
        server.start()
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def bench_logs(name: str, level: str) -> Iterator[Path]:
    """The service's JSON logs go to a file (kept only when the run fails).

    Logging stays on at the production level: its cost is part of what is measured.
    """
    fd, raw_path = tempfile.mkstemp(prefix=f"sw-bench-{name}-", suffix=".log")
    path = Path(raw_path)
    stream: TextIO = os.fdopen(fd, "w", buffering=1 << 16)
    logs.configure(level, stream=stream)
    ok = False
    try:
        yield path
        ok = True
    finally:
        logs.configure("WARNING", stream=sys.stderr)
        stream.close()
        if ok:
            path.unlink(missing_ok=True)
        else:
            print(f"service log kept at {path}", file=sys.stderr)


def bench_settings(dsn: str, redis_url: str, cafile: str, **overrides: str) -> Settings:
    """Production defaults, except where the service must find our private servers."""
    env = {
        "SHARDWORKER_DATABASE_URL": dsn,
        "SHARDWORKER_REDIS_URL": redis_url,
        "SHARDWORKER_SECRET_KEYS": BENCH_KEYS,
        "SHARDWORKER_SECRET_READ_CHAIN": "db",
        "SHARDWORKER_TLS_CA_FILE": cafile,
    }
    env.update({f"SHARDWORKER_{k.upper()}": v for k, v in overrides.items()})
    return load_settings(env)


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as SHARDWORKER_* variables, to rebuild them in a spawned process."""
    out: dict[str, str] = {}
    for name, value in vars(settings).items():
        text = ",".join(value) if isinstance(value, tuple) else str(value)
        out[f"SHARDWORKER_{name.upper()}"] = text.lower() if isinstance(value, bool) else text
    return out


# ------------------------------------------------------------------------- providers


def create_providers(
    settings: Settings,
    server: Dovecot,
    users: Sequence[ImapUser],
    *,
    tls: bool,
    max_per_sync: int = 50,
) -> tuple[str, list[str]]:
    """One provider (INBOX) per user, passwords in shardworker's encrypted store.

    Returns (tenant, provider ids in the order of ``users``).
    """
    tenant = str(uuid.uuid4())
    pool = open_pool(settings.database_url, max_size=1)
    try:
        secrets = SecretStore(settings, pool)
        pids: list[str] = []
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            for user in users:
                pid = create_provider(
                    conn, tenant=tenant, mailbox=f"{user.name}@example.com", host=server.host,
                    port=server.tls_port if tls else server.plain_port, secure=tls,
                    allow_starttls=False, auth_type="password", username=user.name,
                    max_emails_per_sync=max_per_sync,
                )  # fmt: skip
                secrets.put(tenant, pid, secret_name("password", pid), user.password)
                pids.append(pid)
    finally:
        pool.close()
    return tenant, pids


def tenant_configs(ctx: WorkerContext, tenant: str) -> list[ProviderConfig]:
    return [p for p in ctx.store.load_providers() if p.tenant == tenant and not p.paused]


# ---------------------------------------------------------------------------- engine


class EngineRun:
    """One in-process engine on its own thread, as ``shardworker run`` would drive it."""

    def __init__(self, settings: Settings) -> None:
        self.ctx = build_worker(settings)
        self.engine = self.ctx.engine
        self._thread = threading.Thread(
            target=self.engine.run, kwargs={"drain_deadline_s": 30}, name="engine", daemon=True
        )
        self._thread.start()

    def serve(self, configs: Sequence[ProviderConfig]) -> None:
        self.engine.update_providers(configs)

    def census(self, timeout_s: float = 10.0) -> Counter[str]:
        """Slot states, counted on the loop thread (the only owner of that state)."""
        done = threading.Event()
        counts: Counter[str] = Counter()

        def count() -> None:
            for rt in self.engine.providers.values():
                for slot in rt.slots.values():
                    counts[slot.state.value] += 1
            done.set()

        self.engine.post(count)
        if not done.wait(timeout_s):
            raise RuntimeError("the engine loop did not answer a census within 10 s")
        return counts

    def wait_idle(self, expected: int, timeout_s: float, label: str = "idle") -> float:
        """Block until ``expected`` slots are IDLE; seconds taken.  Prints progress."""
        start = time.monotonic()
        last_print = start
        while True:
            counts = self.census()
            if counts["idle"] >= expected:
                return time.monotonic() - start
            now = time.monotonic()
            if now - start > timeout_s:
                raise RuntimeError(f"only {counts['idle']}/{expected} {label} after "
                                   f"{timeout_s:.0f}s: {dict(counts)}; "
                                   f"errors {dict(self.engine.stats.errors)}")  # fmt: skip
            if now - last_print > 5:
                last_print = now
                print(f"  ... {counts['idle']}/{expected} {label} after {now - start:.0f}s",
                      flush=True)  # fmt: skip
            time.sleep(0.2)

    def stop(self) -> None:
        self.engine.request_stop()
        self._thread.join(60)
        if self._thread.is_alive():
            print("warning: the engine did not stop within 60 s", file=sys.stderr)
        self.ctx.close()


# ------------------------------------------------------------------------------ mail

_WORDS = (
    "ticket",
    "printer",
    "server",
    "invoice",
    "account",
    "password",
    "reset",
    "network",
    "outage",
    "please",
    "urgent",
    "customer",
    "request",
    "update",
    "meeting",
    "schedule",
    "laptop",
    "monitor",
    "backup",
    "restore",
    "license",
    "renewal",
    "contract",
    "billing",
    "question",
    "issue",
    "resolved",
    "pending",
    "escalation",
    "firewall",
    "mailbox",
    "calendar",
    "access",
    "permission",
    "report",
    "quarterly",
    "support",
    "team",
    "thanks",
    "regards",
    "appreciate",
    "attached",
    "screenshot",
    "error",
    "message",
    "cannot",
    "connect",
    "café",
    "naïve",
    "Zürich",
    "façade",
    "résumé",
)


def _paragraphs(rng: random.Random, target_chars: int) -> list[str]:
    out: list[str] = []
    size = 0
    while size < target_chars:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(25, 60))]
        para = " ".join(words).capitalize() + "."
        out.append(para)
        size += len(para) + 2
    return out


def _qp(text: str) -> bytes:
    return quopri.encodestring(text.encode("utf-8")).replace(b"\n", b"\r\n")


def realistic_mail(rng: random.Random, message_id: str, target_bytes: int = 12_000) -> bytes:
    """A ~``target_bytes`` multipart/alternative (text + html, quoted-printable, UTF-8)
    with the header block a real message carries (Received, DKIM, List-*)."""
    paras = _paragraphs(rng, int(target_bytes * 0.36))
    text = "\n\n".join(paras) + "\n\n-- \nSupport desk\n"
    html = (
        '<html><head><meta charset="utf-8"><style>p{margin:0 0 8px}</style></head>'
        '<body><div class="msg">'
        + "".join(f'<p style="font-family:Arial,sans-serif">{p}</p>\n' for p in paras)
        + "<p>-- <br>Support desk</p></div></body></html>\n"
    )
    boundary = f"----=_Part_{rng.getrandbits(64):016x}"
    sender = f"user{rng.randint(1, 500)}@customer{rng.randint(1, 40)}.example.com"
    head = (
        f"Return-Path: <{sender}>\r\n"
        f"Received: from mx{rng.randint(1, 9)}.example.net (mx.example.net [192.0.2.{rng.randint(1, 254)}])\r\n"  # noqa: E501
        f"\tby imap.example.com with ESMTPS id {rng.getrandbits(48):x}; {format_datetime(_now())}\r\n"  # noqa: E501
        f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=s1;\r\n"
        f"\tbh={rng.getrandbits(256):064x}=;\r\n\tb={rng.getrandbits(512):0128x}=\r\n"
        f"Date: {format_datetime(_now())}\r\n"
        f'From: "Customer {rng.randint(1, 999)}" <{sender}>\r\n'
        f"To: Support <support@example.com>\r\n"
        f"Subject: Re: {' '.join(rng.choice(_WORDS) for _ in range(6))}\r\n"
        f"Message-ID: {message_id}\r\n"
        f"List-Unsubscribe: <mailto:unsubscribe@example.com>\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'
    )
    part = "Content-Type: text/{}; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"  # noqa: E501
    return b"".join([
        head.encode(),
        f"--{boundary}\r\n{part.format('plain')}".encode(), _qp(text), b"\r\n",
        f"--{boundary}\r\n{part.format('html')}".encode(), _qp(html), b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ])  # fmt: skip


def _now() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------ bare IDLE client


@functools.lru_cache(maxsize=4)
def _client_context(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


def bare_client(
    host: str, port: int, tls: bool, cafile: str, user: ImapUser
) -> imapclient.IMAPClient:
    """A plain imapclient session: login, EXAMINE INBOX (one TLS context per CA file)."""
    client = imapclient.IMAPClient(
        host, port=port, ssl=tls, ssl_context=_client_context(cafile), timeout=15
    )
    client.login(user.name, user.password)
    client.select_folder("INBOX", readonly=True)
    return client


def _buffered(client: imapclient.IMAPClient) -> bool:
    """Data already read off the socket (imaplib's reader, or TLS records), which a
    select() on the socket would never report: the buffered-EXISTS race."""
    sock = client.socket()
    reader = client._imap.file
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return bool(reader.peek(1))
    except (BlockingIOError, OSError, ValueError):
        return False
    finally:
        sock.settimeout(timeout)


def wait_for_exists(client: imapclient.IMAPClient, timeout_s: float) -> float:
    """In IDLE: block until an ``* n EXISTS`` line arrives; its arrival time (monotonic).

    Lines are read straight off imaplib's reader, so the time is taken the moment the
    line is complete, and a line buffered together with ``+ idling`` is not missed.
    """
    sock = client.socket()
    imap = client._imap
    deadline = time.monotonic() + timeout_s
    while True:
        if not _buffered(client):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no EXISTS within {timeout_s}s")
            readable, _, _ = select.select([sock], [], [], remaining)
            if not readable:
                continue
        line = imap.readline()
        if not line:
            raise ConnectionError("server closed the IDLE connection")
        if line.rstrip().upper().endswith(b"EXISTS"):
            return time.monotonic()


SAMPLE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class PushTarget:
    """Where the bare IDLE client and the appender connect."""

    host: str
    port: int
    tls: bool
    cafile: str

    @classmethod
    def of(cls, server: Dovecot, tls: bool) -> PushTarget:
        port = server.tls_port if tls else server.plain_port
        return cls(server.host, port, tls, str(server.cafile))


@dataclass(frozen=True)
class Sample:
    floor_s: float  # APPEND done → EXISTS at the bare client
    overhead_s: float  # EXISTS at the bare client → the pipeline under test is done


def push_sample(
    target: PushTarget,
    user: ImapUser,
    seq: int,
    size: int,
    arm: Callable[[str], Callable[[], float]],
) -> Sample:
    """One APPEND on ``user``'s INBOX, timed twice for the same message.

    A bare imapclient session IDLEs on the mailbox and notes when EXISTS arrives (the
    server's push floor).  ``arm(message_id)`` is called before the APPEND and returns a
    function that blocks until the pipeline under test has handled that message and
    returns when (time.monotonic seconds).
    """
    bare = bare_client(target.host, target.port, target.tls, target.cafile, user)
    appender = bare_client(target.host, target.port, target.tls, target.cafile, user)
    try:
        bare.idle()
        mid = f"<lat-{seq}-{secrets.token_hex(6)}@bench.example.com>"
        raw = realistic_mail(random.Random(seq), mid, size)
        wait_done = arm(mid)
        seen: dict[str, float | BaseException] = {}

        def watch() -> None:
            try:
                seen["t"] = wait_for_exists(bare, SAMPLE_TIMEOUT_S)
            except BaseException as exc:  # reported below, on the caller's thread
                seen["t"] = exc

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        appender.append("INBOX", raw)
        t_appended = time.monotonic()
        t_done = wait_done()
        watcher.join(SAMPLE_TIMEOUT_S)
        t_exists = seen.get("t")
        if not isinstance(t_exists, float):
            raise RuntimeError(f"bare IDLE client saw no EXISTS: {t_exists!r}")
        bare.idle_done()
        return Sample(floor_s=t_exists - t_appended, overhead_s=t_done - t_exists)
    finally:
        for client in (bare, appender):
            with contextlib.suppress(Exception):
                client.logout()


def latency_rows(samples: Sequence[Sample]) -> list[tuple[str, str]]:
    floors = [s.floor_s for s in samples]
    over = [s.overhead_s for s in samples]
    return [
        ("floor p50 / p99 (APPEND done → bare EXISTS)",
         f"{ms(percentile(floors, 50))} / {ms(percentile(floors, 99))}"),
        ("overhead p50", ms(percentile(over, 50))),
        ("overhead p99", ms(percentile(over, 99))),
        ("overhead max", ms(max(over))),
    ]  # fmt: skip


# ---------------------------------------------------------------------------- figures


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: every figure is a measured sample)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def print_table(title: str, rows: Sequence[tuple[str, str]], out: TextIO = sys.stdout) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}", file=out)
    print("-" * len(title), file=out)
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}", file=out)
    out.flush()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def rss_kib(pid: int | str = "self") -> int:
    """VmRSS of a process in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS line")


def machine_note() -> str:
    """Load average and core count, printed with every result: the machine is shared."""
    load1, load5, _ = os.getloadavg()
    return f"load {load1:.2f} (1 min) / {load5:.2f} (5 min) on {os.cpu_count()} cores"


def load1() -> float:
    """The 1-minute load average, which every figure file carries."""
    return round(os.getloadavg()[0], 2)


Figure = float | int | None


def add_json_option(parser: Any) -> None:
    parser.add_argument("--json", metavar="PATH",
                        help="also write the figures to PATH as one JSON object")  # fmt: skip


def write_figures(path: str | None, figures: Mapping[str, Figure]) -> None:
    """The run's figures as one flat JSON object (a NaN, i.e. no sample, becomes null)."""
    if path is None:
        return
    clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in figures.items()}
    Path(path).write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    print(f"figures written to {path}", flush=True)


def cpu_seconds() -> float:
    """User + system CPU of this process (all threads)."""
    t = os.times()
    return t.user + t.system


def fail(message: str) -> None:
    """A benchmark whose result cannot be trusted stops loudly with exit status 1."""
    print(f"\nBENCHMARK FAILED: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def run_with_progress(label: str, fn: Callable[[], Any]) -> Any:
    print(f"{label} ...", end="", flush=True)
    start = time.monotonic()
    value = fn()
    print(f" {time.monotonic() - start:.1f}s", flush=True)
    return value


# ------------------------------------------------------------------- stage breakdown


class StageTracer:
    """Where a push cycle's time goes: wraps engine collaborators (this process only).

    A diagnostic, off by default: it patches class attributes at run time, so the
    product code is untouched and the cost of tracing (~µs per call) is small next to
    the stages it times.  Each cycle that started from an EXISTS gets one record of
    (stage, start, end) relative to the moment the loop saw the socket readable.
    """

    STAGES = (
        ("shardworker.imap.session", "FolderSession", "leave_idle"),
        ("shardworker.imap.session", "FolderSession", "leave_idle_fetching"),
        ("shardworker.imap.session", "FolderSession", "new_messages"),
        ("shardworker.imap.session", "FolderSession", "fetch_bodies"),
        ("shardworker.imap.session", "FolderSession", "enter_idle"),
        ("shardworker.db.store", "Store", "known_uids"),
        ("shardworker.db.store", "Store", "known_message_ids"),
        ("shardworker.db.store", "Store", "known_uids_and_message_ids"),
        ("shardworker.db.store", "Store", "commit_batch"),
        ("shardworker.sink.redis_streams", "RedisStreamsSink", "publish_batch"),
        ("shardworker.sink.redis_streams", "RedisStreamsSink", "backpressured"),
        ("shardworker.gate", "MessageGate", "assess"),  # classify, no Redis
        ("shardworker.gate", "MessageGate", "ask"),  # the guard's own round trip (flag)
    )

    def __init__(self) -> None:
        self.cycles: list[list[tuple[str, float, float]]] = []
        self.cycle_seen: list[float] = []  # when the loop saw each push cycle's EXISTS
        self.other_cycles: list[tuple[str, float]] = []  # (cause, start) of the others
        self._local = threading.local()
        self._undo: list[Callable[[], None]] = []

    def install(self) -> None:
        import importlib

        for module_name, cls_name, attr in self.STAGES:
            cls = getattr(importlib.import_module(module_name), cls_name)
            self._wrap(cls, attr, attr)
        sync = importlib.import_module("shardworker.engine.sync")
        self._wrap_function(sync, "parse_message", "parse")
        cycle = importlib.import_module("shardworker.engine.cycle")
        self._wrap_cycle(cycle.Cycle)

    def uninstall(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def _record(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def traced(*args: Any, **kwargs: Any) -> Any:
            rec = getattr(self._local, "rec", None)
            if rec is None:
                return fn(*args, **kwargs)
            start = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                # A stage met again in the same cycle is told apart: "new_messages #2".
                seen = sum(1 for n, _, _ in rec if n.split(" #")[0] == name)
                label = f"{name} #{seen + 1}" if seen else name
                rec.append((label, start - self._local.t0, time.monotonic() - self._local.t0))

        return traced

    def _wrap(self, cls: Any, attr: str, name: str) -> None:
        original = cls.__dict__[attr]
        setattr(cls, attr, self._record(name, original))
        self._undo.append(lambda: setattr(cls, attr, original))

    def _wrap_function(self, module: Any, attr: str, name: str) -> None:
        original = getattr(module, attr)
        setattr(module, attr, self._record(name, original))
        self._undo.append(lambda: setattr(module, attr, original))

    def _wrap_cycle(self, cls: Any) -> None:
        original = cls.__dict__["run"]

        def run(cycle: Any, slot: Any) -> Any:
            seen = slot.exists_seen_at
            started = time.monotonic()
            if seen is None:  # a timer: IDLE refresh, reconnect, poll
                self.other_cycles.append(("timer", started))
                return original(cycle, slot)
            rec: list[tuple[str, float, float]] = [("queued", 0.0, started - seen)]
            self._local.rec, self._local.t0 = rec, seen
            try:
                return original(cycle, slot)
            finally:
                self._local.rec = None
                if any(name.startswith("publish_batch") for name, _, _ in rec):
                    self.cycles.append(rec)
                    self.cycle_seen.append(seen)
                else:  # readable, nothing new: a keepalive ("* OK Still here") or the like
                    self.other_cycles.append(("readable, nothing published", started))

        cls.run = run
        self._undo.append(lambda: setattr(cls, "run", original))

    def background(self) -> list[tuple[str, str]]:
        """Cycles that published nothing, by cause: how many, and the busiest second."""
        rows: list[tuple[str, str]] = []
        for kind in sorted({k for k, _ in self.other_cycles}):
            times = [t for k, t in self.other_cycles if k == kind]
            per_second = Counter(int(t) for t in times)
            rows.append((kind, f"{len(times)} cycles, peak {max(per_second.values())}/s"))
        return rows or [("none", "")]

    def table(self) -> list[tuple[str, str]]:
        """Per stage: duration p50 / p99, and median end time relative to EXISTS."""
        durations: dict[str, list[float]] = {}
        ends: dict[str, list[float]] = {}
        for rec in self.cycles:
            for name, start, end in rec:
                durations.setdefault(name, []).append(end - start)
                ends.setdefault(name, []).append(end)
        return [
            (name, f"{ms(percentile(durations[name], 50))} / "
                   f"{ms(percentile(durations[name], 99))} (ends at "
                   f"+{ms(percentile(ends[name], 50))}, {len(durations[name])} calls)")
            for name in durations
        ]  # fmt: skip

    def slowest(self, count: int = 3) -> list[tuple[str, str]]:
        """The slowest cycles to XADD, stage by stage (where a tail comes from)."""

        def xadd_end(rec: list[tuple[str, float, float]]) -> float:
            return max(end for name, _, end in rec if name.startswith("publish_batch"))

        rows: list[tuple[str, str]] = []
        origin = min(self.cycle_seen, default=0.0)
        ranked = sorted(zip(self.cycles, self.cycle_seen, strict=True),
                        key=lambda pair: xadd_end(pair[0]), reverse=True)  # fmt: skip
        for rank, (rec, seen) in enumerate(ranked[:count], 1):
            stages = ", ".join(f"{name} {ms(end - start)}" for name, start, end in rec)
            rows.append((f"#{rank} at {seen - origin:.0f}s: XADD +{ms(xadd_end(rec))}", stages))
        return rows
