"""Dovecot 2.3 configuration for a private test instance.

The file is assembled from sections so an option (hidden IDLE, an oauth2 passdb, raw extra
settings) is one function that contributes text, not an edit of one big template. The
limits come from docs/testbed-notes.md: without them the 11th session of a user fails with
[LIMIT], and IDLE degrades to 30 s polling once inotify instances run out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Dovecot 2.3.19's post-login capability list, minus IDLE (for polling-fallback tests).
CAPABILITY_WITHOUT_IDLE = (
    "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE SORT SORT=DISPLAY THREAD=REFERENCES "
    "THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN "
    "NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES "
    "WITHIN CONTEXT=SEARCH LIST-STATUS BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW "
    "STATUS=SIZE SAVEDATE LITERAL+ NOTIFY SPECIAL-USE"
)
SPECIAL_USE = {"Drafts": "\\Drafts", "Sent": "\\Sent", "Junk": "\\Junk",
               "Trash": "\\Trash", "Archive": "\\Archive"}  # fmt: skip
MANY = 100_000


@dataclass(frozen=True)
class DovecotOptions:
    """What a test may vary between instances."""

    hide_idle: bool = False
    # When set: an oauth2 passdb (XOAUTH2/OAUTHBEARER) asking this RFC 7662 endpoint.
    oauth2_introspection_url: str | None = None
    oauth2_username_attribute: str = "username"
    # Appended verbatim at the end of the file (later settings win in Dovecot).
    extra_conf: str = ""


@dataclass(frozen=True)
class DovecotLayout:
    """Paths, ports and identities of one instance."""

    root: Path
    instance_name: str
    plain_port: int
    tls_port: int
    certfile: Path
    keyfile: Path
    cafile: Path
    mail_uid: int
    mail_gid: int
    # None as root (Dovecot's own dovecot/dovenull); the invoking user otherwise.
    service_user: str | None
    service_group: str | None

    @property
    def base_dir(self) -> Path:
        return self.root / "run"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log_path(self) -> Path:
        return self.root / "dovecot.log"

    @property
    def passwd_dir(self) -> Path:
        """One passwd-file per user: Dovecot 2.3 re-reads a changed file at most once a
        second, so a user appended to a shared file may be "unknown" for up to 1 s."""
        return self.root / "passwd.d"

    @property
    def mail_root(self) -> Path:
        return self.root / "mail"

    @property
    def conf_path(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def oauth2_conf_path(self) -> Path:
        return self.root / "dovecot-oauth2.conf.ext"


def _core(lay: DovecotLayout) -> str:
    identity = ""
    if lay.service_user is not None:
        identity = (
            f"default_internal_user = {lay.service_user}\n"
            f"default_internal_group = {lay.service_group}\n"
            f"default_login_user = {lay.service_user}\n"
        )
    return f"""\
instance_name = {lay.instance_name}
base_dir = {lay.base_dir}
state_dir = {lay.state_dir}
log_path = {lay.log_path}
info_log_path = {lay.log_path}
debug_log_path = {lay.log_path}
protocols = imap
listen = 127.0.0.1
{identity}first_valid_uid = 1
first_valid_gid = 1
ssl = yes
ssl_cert = <{lay.certfile}
ssl_key = <{lay.keyfile}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = no
# Tests try wrong passwords on purpose; the default 2 s penalty only slows them down.
auth_failure_delay = 0 secs
mail_location = maildir:~/Maildir
mail_fsync = never
mail_max_userip_connections = {MANY}
default_client_limit = 19000
mailbox_idle_check_interval = 1 secs
"""


def _passwd_file(lay: DovecotLayout, oauth2: bool) -> str:
    # With an oauth2 passdb present the passwd-file must not try to answer token logins.
    mechanisms = "  mechanisms = plain login\n" if oauth2 else ""
    return f"""\
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {lay.passwd_dir}/%u
{mechanisms}}}
userdb {{
  driver = passwd-file
  args = username_format=%u {lay.passwd_dir}/%u
  default_fields = uid={lay.mail_uid} gid={lay.mail_gid} home={lay.mail_root}/%u
}}
"""


def _oauth2(lay: DovecotLayout) -> str:
    return f"""\
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {lay.oauth2_conf_path}
}}
"""


def oauth2_conf(opts: DovecotOptions) -> str:
    """The passdb oauth2 args file: token introspection by POST to a local URL."""
    return f"""\
introspection_mode = post
introspection_url = {opts.oauth2_introspection_url}
username_attribute = {opts.oauth2_username_attribute}
active_attribute = active
active_value = true
"""


def _namespace() -> str:
    boxes = "".join(
        f"  mailbox {name} {{\n    special_use = {flag}\n  }}\n"
        for name, flag in SPECIAL_USE.items()
    )
    return f"namespace inbox {{\n  inbox = yes\n  separator = /\n{boxes}}}\n"


def _services(lay: DovecotLayout) -> str:
    return f"""\
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {lay.plain_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {lay.tls_port}
    ssl = yes
  }}
  service_count = 0
  process_min_avail = 2
  process_limit = 4
  client_limit = 4000
}}
service imap {{
  service_count = 0
  client_limit = 100
  process_limit = 100
}}
protocol imap {{
  mail_max_userip_connections = {MANY}
}}
# No per-IP auth penalty: after one wrong password every login from 127.0.0.1, even a
# correct one, would wait 2-15 s. Mode 0 means the listener is not created at all.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""


def render_config(lay: DovecotLayout, opts: DovecotOptions) -> str:
    """The whole dovecot.conf for `lay` with `opts` applied."""
    oauth2 = opts.oauth2_introspection_url is not None
    mechanisms = "plain login" + (" xoauth2 oauthbearer" if oauth2 else "")
    parts = [
        "# generated by tests/harness/dovecot_conf.py\n",
        _core(lay),
        f"auth_mechanisms = {mechanisms}\n",
        _passwd_file(lay, oauth2),
        _oauth2(lay) if oauth2 else "",
        _namespace(),
        _services(lay),
        f"imap_capability = {CAPABILITY_WITHOUT_IDLE}\n" if opts.hide_idle else "",
        opts.extra_conf,
    ]
    return "".join(p if p.endswith("\n") or not p else p + "\n" for p in parts)
