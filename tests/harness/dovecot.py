"""A private Dovecot 2.3 for tests and benchmarks.

    dc = Dovecot(hide_idle=False)
    dc.start()
    user, password = dc.add_user()
    uid = dc.append(user, "INBOX", raw_bytes)
    ...
    dc.close()

Each instance owns a temp directory (config, TLS files, passwd-files, mail, sockets, log;
on tmpfs when there is room) and two free loopback ports: plain (STARTTLS offered) and
implicit TLS. Each user has its own one-line passwd-file: Dovecot re-reads a changed file
at most once a second, but reads a file it has not seen yet at once, so a new user can log
in immediately, and adding thousands costs milliseconds.
Mail is loaded over IMAP as the user (APPEND, MULTIAPPEND) because that is 30x faster than
one `doveadm save` process per message.
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import os
import pwd
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple, TypeVar

import imapclient
from imapclient.exceptions import IMAPClientAbortError

from tests.harness.dovecot_conf import DovecotLayout, DovecotOptions, oauth2_conf, render_config
from tests.harness.imap_util import parse_append_uids
from tests.harness.net import free_ports, port_is_open
from tests.harness.tls import make_tls_files

T = TypeVar("T")
TlsMode = Literal["plain", "starttls", "implicit"]
MAIL_USER = "vmail"
INOTIFY_INSTANCES = 1024
CLIENT_TIMEOUT_S = 15.0
BATCH = 100
SHM = "/dev/shm"
SHM_MIN_FREE_BYTES = 2 << 30


_LIVE: set[Dovecot] = set()


@atexit.register
def _kill_leftovers() -> None:
    """A run that never reached close() must not leave a Dovecot (or its tmpfs dir) behind."""
    for instance in list(_LIVE):
        instance.close()


class DovecotError(RuntimeError):
    """The private Dovecot could not be started, stopped or administered."""


class ImapUser(NamedTuple):
    name: str
    password: str


def _ensure_mail_user() -> tuple[int, int]:
    """uid/gid for mail files: a system `vmail` when root (Dovecot refuses uid 0)."""
    try:
        entry = pwd.getpwnam(MAIL_USER)
    except KeyError:
        cmd = ["useradd", "--system", "--user-group", "--no-create-home",
               "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", MAIL_USER]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        # 9: created meanwhile by a parallel run.
        if done.returncode not in (0, 9):
            raise DovecotError(f"useradd {MAIL_USER} failed: {done.stderr.strip()}") from None
        entry = pwd.getpwnam(MAIL_USER)
    return entry.pw_uid, entry.pw_gid


def _raise_inotify_limit() -> None:
    """Each imap process takes an inotify instance; past the limit IDLE falls back to polling."""
    path = Path("/proc/sys/fs/inotify/max_user_instances")
    try:
        if int(path.read_text()) < INOTIFY_INSTANCES:
            path.write_text(f"{INOTIFY_INSTANCES}\n")
    except (OSError, ValueError):
        pass  # best effort: read-only /proc in some sandboxes


def _binary(name: str) -> str | None:
    """Dovecot lives in /usr/sbin, which a non-login shell's PATH may lack."""
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def _scratch_parent() -> str | None:
    """tmpfs when it has room: creating a user file there takes 15 us instead of 0.1-1 ms
    on this disk, and mail I/O stops depending on other jobs' disk load."""
    try:
        stats = os.statvfs(SHM)
    except OSError:
        return None
    if stats.f_bavail * stats.f_frsize >= SHM_MIN_FREE_BYTES and os.access(SHM, os.W_OK):
        return SHM
    return None


def _identity() -> tuple[int, int, str | None, str | None]:
    """(mail uid, mail gid, service user, service group); service names None when root."""
    if os.geteuid() == 0:
        _raise_inotify_limit()
        uid, gid = _ensure_mail_user()
        return uid, gid, None, None
    uid, gid = os.getuid(), os.getgid()
    return uid, gid, pwd.getpwuid(uid).pw_name, grp.getgrgid(gid).gr_name


class Dovecot:
    """One private Dovecot instance (see module docstring)."""

    host = "127.0.0.1"

    def __init__(
        self,
        root: Path | None = None,
        *,
        hide_idle: bool = False,
        oauth2_introspection_url: str | None = None,
        extra_conf: str = "",
    ) -> None:
        self.options = DovecotOptions(
            hide_idle=hide_idle,
            oauth2_introspection_url=oauth2_introspection_url,
            extra_conf=extra_conf,
        )
        self._owns_root = root is None
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="sw-dovecot-", dir=_scratch_parent()))
        self.root = root
        self._proc: subprocess.Popen[bytes] | None = None
        self._users: dict[str, str] = {}
        self._seq = 0
        self._clients: dict[str, imapclient.IMAPClient] = {}
        self._lock = threading.RLock()
        self.layout = self._prepare()
        _LIVE.add(self)

    # ----------------------------------------------------------------- setup

    def _prepare(self) -> DovecotLayout:
        uid, gid, service_user, service_group = _identity()
        self.root.mkdir(parents=True, exist_ok=True)
        # Dovecot's unprivileged auth and mail processes must traverse the root.
        self.root.chmod(0o711)
        tls = make_tls_files(self.root)
        plain_port, tls_port = free_ports(2)
        lay = DovecotLayout(
            root=self.root, instance_name=f"sw-dovecot-{secrets.token_hex(3)}",
            plain_port=plain_port, tls_port=tls_port, certfile=tls.certfile,
            keyfile=tls.keyfile, cafile=tls.cafile, mail_uid=uid, mail_gid=gid,
            service_user=service_user, service_group=service_group,
        )  # fmt: skip
        for path in (lay.base_dir, lay.state_dir, lay.mail_root):
            path.mkdir(exist_ok=True)
        os.chown(lay.mail_root, uid, gid)
        lay.mail_root.chmod(0o700)
        lay.passwd_dir.mkdir(exist_ok=True)
        lay.passwd_dir.chmod(0o755)
        if self.options.oauth2_introspection_url is not None:
            lay.oauth2_conf_path.write_text(oauth2_conf(self.options))
            lay.oauth2_conf_path.chmod(0o644)
        lay.conf_path.write_text(render_config(lay, self.options))
        return lay

    # ------------------------------------------------------------ properties

    @property
    def plain_port(self) -> int:
        return self.layout.plain_port

    @property
    def tls_port(self) -> int:
        return self.layout.tls_port

    @property
    def cafile(self) -> Path:
        return self.layout.cafile

    @property
    def conf_path(self) -> Path:
        return self.layout.conf_path

    @property
    def log_path(self) -> Path:
        return self.layout.log_path

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this instance's CA (and verifies the hostname)."""
        return ssl.create_default_context(cafile=str(self.cafile))

    # --------------------------------------------------------------- process

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the master in the foreground as our child; return once both ports answer."""
        if self.running():
            return
        if self._proc is not None:
            self.kill()  # the master died on its own: clear what is left of its group
        binary = _binary("dovecot")
        if binary is None:
            raise DovecotError("dovecot is not installed (scripts/install-deps.sh installs it)")
        stderr_path = self.root / "stderr.log"
        with stderr_path.open("wb") as stderr:
            # Own process group: kill() can take every child at once, and Ctrl-C in the
            # terminal reaches only pytest, whose teardown then stops us in order.
            self._proc = subprocess.Popen(
                [binary, "-F", "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True,
            )  # fmt: skip
        self._wait_ready(timeout_s, stderr_path)

    def _wait_ready(self, timeout_s: float, stderr_path: Path) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if port_is_open(self.plain_port) and port_is_open(self.tls_port):
                return
            time.sleep(0.02)
        output = stderr_path.read_text(errors="replace").strip()
        self.kill()
        raise DovecotError(
            f"dovecot -c {self.conf_path} did not come up on ports "
            f"{self.plain_port}/{self.tls_port} within {timeout_s}s: {output}\n"
            f"log tail: {self.log_text()[-2000:]}"
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful stop (clients get `* BYE`); files, users and ports are kept for start().

        SIGTERM to our own child master is what `doveadm stop` sends, minus its 1 s polling
        (about 1.1 s instead of 3 s).
        """
        self._close_clients()
        if self._proc is not None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout_s)  # on timeout the group kill below ends it
            # Stragglers only (none after a clean shutdown), or all if the master hung.
            self._kill_group()
            self._proc.wait(10)
            self._proc = None
        self._wait_ports_closed(timeout_s)

    def kill(self) -> None:
        """SIGKILL the master and every child at once: a server crash, no `* BYE`."""
        self._close_clients()
        if self._proc is not None:
            self._kill_group()
            self._proc.wait(10)
            # Children may outlive the master by a moment; the listeners must be gone.
            self._kill_group()
            self._proc = None
        self._wait_ports_closed(10.0)

    def _kill_group(self) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)

    def _wait_ports_closed(self, timeout_s: float) -> None:
        # Children that still hold the listening sockets would make the next start fail.
        deadline = time.monotonic() + timeout_s
        while port_is_open(self.plain_port) or port_is_open(self.tls_port):
            if time.monotonic() > deadline:
                raise DovecotError(f"ports {self.plain_port}/{self.tls_port} still open")
            time.sleep(0.02)

    def restart(self, *, graceful: bool = True) -> None:
        """Stop (or crash, graceful=False) and start again: same ports, users and mail."""
        if graceful:
            self.stop()
        else:
            self.kill()
        self.start()

    def close(self) -> None:
        """Kill (nothing is kept, so no graceful stop) and delete our directory."""
        _LIVE.discard(self)
        try:
            self.kill()
        finally:
            if self._owns_root:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --------------------------------------------------------------- doveadm

    def _doveadm_run(
        self, args: Sequence[str], input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_binary("doveadm") or "doveadm", "-c", str(self.conf_path), *args],
            input=input_text, capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip

    def doveadm(self, *args: str, input_text: str | None = None) -> str:
        """Run `doveadm -c CONF ARGS...`; stdout, or DovecotError with stderr."""
        done = self._doveadm_run(args, input_text)
        if done.returncode != 0:
            raise DovecotError(
                f"doveadm {' '.join(args[:2])} exited {done.returncode}: {done.stderr.strip()}"
            )
        return done.stdout

    def who(self) -> dict[str, int]:
        """Logged-in users and their connection counts (all services summed)."""
        counts: dict[str, int] = {}
        lines = self.doveadm("-f", "tab", "who").splitlines()
        for line in lines[1:]:  # first line is the header
            fields = line.split("\t")
            if len(fields) >= 2 and fields[1].isdigit():
                counts[fields[0]] = counts.get(fields[0], 0) + int(fields[1])
        return counts

    def kick(self, user: str) -> None:
        """Disconnect every session of `user` (no error when it has none).

        Dovecot kicks by killing imap processes. One process serves up to 100 sessions
        (client_limit), so other users' sessions that share a process are cut too; without
        -f the kick would silently leave `user` connected whenever a process is shared.
        """
        self._close_client(user)
        done = self._doveadm_run(["kick", "-f", user])
        # 68 (EX_NOUSER): the user had no session, so there was nothing to kick.
        if done.returncode not in (0, 68):
            raise DovecotError(f"doveadm kick exited {done.returncode}: {done.stderr.strip()}")

    def set_uidvalidity(self, user: str, folder: str, value: int) -> None:
        """Force UIDVALIDITY of `folder` (UTF-8 name) to `value`, as after a server rebuild."""
        self.doveadm("mailbox", "update", "-u", user, "--uid-validity", str(value), folder)

    # ----------------------------------------------------------------- users

    def _new_name(self, prefix: str) -> str:
        while True:
            self._seq += 1
            name = f"{prefix}{self._seq}"
            if name not in self._users:
                return name

    def add_users(self, n: int, prefix: str = "user") -> list[ImapUser]:
        """Create `n` users named `prefix<seq>` with random passwords."""
        with self._lock:
            users = [ImapUser(self._new_name(prefix), secrets.token_urlsafe(12)) for _ in range(n)]
            self._write_users(users)
        return users

    def add_user(self, name: str | None = None, password: str | None = None) -> ImapUser:
        """Create one user (random name/password when not given)."""
        with self._lock:
            user = ImapUser(
                name if name is not None else self._new_name("user"),
                password if password is not None else secrets.token_urlsafe(12),
            )
            if user.name in self._users:
                raise ValueError(f"user {user.name!r} already exists")
            self._write_users([user])
        return user

    def _write_users(self, users: Sequence[ImapUser]) -> None:
        for user in users:
            bad = any(c in field for field in user for c in ":\n\r") or "/" in user.name
            if bad or user.name in ("", ".", ".."):
                raise ValueError(f"user {user.name!r}: name/password may not contain ':', '/', EOL")
        for user in users:
            # Trailing colons: without the empty userdb fields Dovecot says "missing userdb info".
            path = self.layout.passwd_dir / user.name
            path.write_text(f"{user.name}:{{PLAIN}}{user.password}::::::\n", encoding="utf-8")
            self._users[user.name] = user.password

    def password(self, user: str) -> str:
        return self._users[user]

    def users(self) -> list[str]:
        return list(self._users)

    # ---------------------------------------------------------------- clients

    def connect(
        self,
        user: str | None = None,
        password: str | None = None,
        *,
        mode: TlsMode = "plain",
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = CLIENT_TIMEOUT_S,
    ) -> imapclient.IMAPClient:
        """A new IMAPClient; logged in as `user` when given. The caller closes it."""
        ctx = ssl_context or self.ssl_context()
        client = imapclient.IMAPClient(
            self.host,  # verified against the certificate's IP SAN
            port=self.tls_port if mode == "implicit" else self.plain_port,
            ssl=mode == "implicit", ssl_context=ctx, timeout=timeout_s,
        )  # fmt: skip
        try:
            if mode == "starttls":
                client.starttls(ctx)
            if user is not None:
                client.login(user, password if password is not None else self._users[user])
        except BaseException:
            with contextlib.suppress(OSError):  # a failed handshake already closed it
                client.shutdown()
            raise
        return client

    def _call(self, user: str, action: Callable[[imapclient.IMAPClient], T]) -> T:
        """Run `action` on the cached admin session of `user`, reconnecting once if stale."""
        with self._lock:
            for attempt in (1, 2):
                client = self._clients.get(user)
                if client is None:
                    client = self._clients[user] = self.connect(user)
                try:
                    return action(client)
                except (IMAPClientAbortError, OSError):
                    # A dead socket (server restarted or user kicked): the command never ran.
                    self._close_client(user)
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

    def _close_client(self, user: str) -> None:
        with self._lock:
            client = self._clients.pop(user, None)
        if client is not None:
            with contextlib.suppress(OSError):
                client.shutdown()

    def close_admin_sessions(self) -> None:
        """Log out the cached sessions used by append(), so who() counts only the clients."""
        self._close_clients()

    def _close_clients(self) -> None:
        for user in list(self._clients):
            self._close_client(user)

    # ------------------------------------------------------------ mail admin

    def append(self, user: str, folder: str, raw: bytes, flags: Iterable[str | bytes] = ()) -> int:
        """APPEND `raw` to `folder` as `user`; returns the new UID."""
        response = self._call(user, lambda c: c.append(folder, raw, flags=tuple(flags)))
        return parse_append_uids(response)[0]

    def append_many(self, user: str, folder: str, raws: Iterable[bytes]) -> list[int]:
        """MULTIAPPEND in batches of 100; returns the new UIDs in order."""
        uids: list[int] = []
        batch: list[bytes] = []
        for raw in raws:
            batch.append(raw)
            if len(batch) == BATCH:
                uids += self._multiappend(user, folder, batch)
                batch = []
        if batch:
            uids += self._multiappend(user, folder, batch)
        return uids

    def _multiappend(self, user: str, folder: str, batch: list[bytes]) -> list[int]:
        response = self._call(user, lambda c: c.multiappend(folder, batch))
        uids = parse_append_uids(response)
        if len(uids) != len(batch):
            raise DovecotError(f"MULTIAPPEND of {len(batch)} returned {len(uids)} UIDs")
        return uids

    def create_folder(self, user: str, name: str) -> None:
        """CREATE `name` (any Unicode; sent as modified UTF-7)."""
        self._call(user, lambda c: c.create_folder(name))

    def delete_folder(self, user: str, name: str) -> None:
        self._call(user, lambda c: c.delete_folder(name))

    def folder_status(self, user: str, name: str) -> dict[str, int]:
        """MESSAGES, UIDNEXT and UIDVALIDITY of `name`."""
        wanted = ("MESSAGES", "UIDNEXT", "UIDVALIDITY")
        status: dict[Any, Any] = self._call(user, lambda c: c.folder_status(name, wanted))
        return {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in status.items()}
