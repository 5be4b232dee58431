"""FolderSession against a scripted server: the buffered-EXISTS race of testbed-notes.md."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from imapclient import IMAPClient

from shardworker.imap.session import FolderSession

GREETING = b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n"


def _serve(listener: socket.socket, same_segment: bool) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.sendall(GREETING)
        reader = conn.makefile("rb")
        while line := reader.readline():
            tag, _, rest = line.decode().partition(" ")
            command = rest.split(" ", 1)[0].strip().upper()
            if command == "CAPABILITY":
                conn.sendall(f"* CAPABILITY IMAP4rev1 IDLE\r\n{tag} OK done\r\n".encode())
            elif command == "LOGIN":
                conn.sendall(f"{tag} OK [CAPABILITY IMAP4rev1 IDLE] logged in\r\n".encode())
            elif command == "EXAMINE":
                conn.sendall(b"* 1 EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n* OK [UIDNEXT 2] n\r\n"
                             + f"{tag} OK [READ-ONLY] done\r\n".encode())  # fmt: skip
            elif command == "IDLE":
                if same_segment:
                    # The race: the push rides in the same segment as the continuation.
                    conn.sendall(b"+ idling\r\n* 2 EXISTS\r\n")
                else:
                    conn.sendall(b"+ idling\r\n")
                assert reader.readline().strip() == b"DONE"
                conn.sendall(f"{tag} OK idle done\r\n".encode())
            elif command == "LOGOUT":
                conn.sendall(f"* BYE\r\n{tag} OK bye\r\n".encode())
                return
            else:
                conn.sendall(f"{tag} OK done\r\n".encode())


@pytest.fixture(params=[True, False], ids=["same-segment", "separate"])
def session(request: pytest.FixtureRequest) -> Iterator[tuple[FolderSession, bool]]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        server = threading.Thread(target=_serve, args=(listener, request.param), daemon=True)
        server.start()
        client = IMAPClient("127.0.0.1", port=listener.getsockname()[1], ssl=False, timeout=5)
        s = FolderSession("INBOX")
        try:
            client.login("u", "p")
            s.attach(client, ["IMAP4REV1", "IDLE"])
            yield s, request.param
        finally:
            s.close(logout=True)
            server.join(5)


def test_enter_idle_sees_an_exists_buffered_with_the_continuation(
    session: tuple[FolderSession, bool],
) -> None:
    s, same_segment = session
    status = s.examine()
    assert (status.uid_validity, status.uid_next, status.exists) == (7, 2, 1)
    # Only the race case has data waiting where the selector would never see it.
    assert s.enter_idle() is same_segment
    s.leave_idle()
    assert not s.idling
