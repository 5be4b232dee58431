"""Issue 12 item 7: nothing from a row, the env chain or a file chain can inject an IMAP
command.  CR, LF and NUL are refused in every value that reaches the wire, with an error
naming the field, and the guard refuses such a line again at the socket.  Checked against
a scripted server that records every raw line it received."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from shardworker.config import load_settings
from shardworker.errors import FolderError, ImapAuthError, ImapProtocolError
from shardworker.imap.connect import Credentials, close_client
from shardworker.imap.session import FolderSession
from shardworker.secrets.store import SecretStore, secret_name
from tests.test_imap_connect import (
    SECRET,
    Script,
    ScriptedServer,
    _open,
    imap_script,
    ok,
    sasl_ok,
    scripted,
)

__all__ = ["scripted"]

INJECTED = "\r\nX1 DELETE INBOX\r\nX3 RENAME INBOX Stolen"


def injected_lines(server: ScriptedServer) -> list[bytes]:
    server.close()
    return [line for line in server.received if line.startswith((b"X1", b"X3", b"X2"))]


@pytest.mark.parametrize(
    ("creds", "field"),
    [
        (Credentials("password", "alice" + INJECTED, SECRET), "username"),
        (Credentials("password", "alice\x00admin", SECRET), "username"),
        (Credentials("password", "alice", "pw" + INJECTED), "password"),
        (Credentials("password", "alice", "pw\x00"), "password"),
        (Credentials("oauth2", "alice", "tok" + INJECTED), "access token"),
        (Credentials("oauth2", "alice\x01auth=Bearer x", "tok"), "username"),
    ],
)
def test_line_breaks_in_credentials_are_refused_before_sending(
    scripted: Callable[[Script], ScriptedServer], creds: Credentials, field: str
) -> None:
    server = scripted(imap_script("IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2",
                                  {"LOGIN": ok, "AUTHENTICATE": sasl_ok}))  # fmt: skip
    with pytest.raises(ImapAuthError) as info:
        _open(server.port, creds)
    assert str(info.value).startswith(field)
    assert info.value.code == "invalid_credentials"
    assert "DELETE" not in str(info.value) and SECRET not in str(info.value)
    assert injected_lines(server) == []
    assert not any(b"LOGIN" in line or b"AUTHENTICATE" in line for line in server.received)


def test_a_folder_name_with_a_line_break_is_not_selected(
    scripted: Callable[[Script], ScriptedServer],
) -> None:
    server = scripted(imap_script("IMAP4rev1", {"LOGIN": ok, "EXAMINE": ok}))
    client = _open(server.port, Credentials("password", "alice", SECRET))
    session = FolderSession("INBOX\r\nX2 DELETE INBOX")
    session.attach(client, ())
    with pytest.raises(FolderError, match="folder name contains a CR, LF or NUL"):
        session.examine()
    close_client(client)
    assert injected_lines(server) == []


def test_the_wire_guard_refuses_any_command_with_an_embedded_line_break(
    scripted: Callable[[Script], ScriptedServer],
) -> None:
    """Whatever path a value takes (LIST patterns, a folder from the server's own LIST
    answer), the socket never carries a second command inside the first."""
    server = scripted(imap_script("IMAP4rev1", {"LOGIN": ok, "EXAMINE": ok, "LIST": ok}))
    client = _open(server.port, Credentials("password", "alice", SECRET))
    with pytest.raises(ImapProtocolError, match="embedded CR, LF or NUL"):
        client._imap._simple_command("LIST", '""', '"x"\r\nX2 DELETE INBOX')
    close_client(client)
    assert injected_lines(server) == []


@pytest.mark.parametrize("source", ["env", "filesystem"])
def test_a_secret_from_the_env_or_file_chain_cannot_inject(
    scripted: Callable[[Script], ScriptedServer],
    source: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The secret store hands out what the chain holds; the login refuses it, naming the
    field, and the server never sees the injected commands."""
    tenant, pid = str(uuid.uuid4()), str(uuid.uuid4())
    name = secret_name("password", pid)
    value = "pw" + INJECTED
    if source == "env":
        monkeypatch.setenv(f"TENANT_{tenant}_{name}", value)
    else:
        (tmp_path / "tenants" / tenant).mkdir(parents=True)
        (tmp_path / "tenants" / tenant / name).write_text(value + "\n")
    settings = load_settings({"SHARDWORKER_SECRET_READ_CHAIN": source,
                              "SHARDWORKER_SECRET_FS_BASE_PATH": str(tmp_path)})  # fmt: skip
    secret = SecretStore(settings, None).get(tenant, pid, name)
    server = scripted(imap_script("IMAP4rev1", {"LOGIN": ok}))
    with pytest.raises(ImapAuthError, match=r"^password contains a CR, LF or NUL"):
        _open(server.port, Credentials("password", "alice", secret))
    assert injected_lines(server) == []
