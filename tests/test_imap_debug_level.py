"""imaplib's debug level on the clients shardworker opens (issue 14).

imapclient sets imaplib's debug level to 5, so imaplib formats every command, response
line, regex match and FETCH result into a message for the ``imapclient.imaplib`` logger,
which never prints them: a bare FETCH ran at 7,400 instead of 31,000 messages per second.
At level 0 imaplib formats nothing.
"""

from __future__ import annotations

import logging
import ssl

import imapclient
import pytest

from shardworker.imap.connect import Credentials, close_client, open_client, tls_context
from tests.harness.dovecot import Dovecot

MESSAGE = (
    b"From: a@example.com\r\nTo: b@example.com\r\nSubject: s\r\n"
    b"Message-ID: <debug-level@example.com>\r\n\r\nbody\r\n"
)


@pytest.mark.parametrize("security", ["plain", "tls"])
def test_imaplib_formats_nothing_for_its_logger(
    dovecot: Dovecot, caplog: pytest.LogCaptureFixture, security: str
) -> None:
    user = dovecot.add_user()
    context: ssl.SSLContext = tls_context(str(dovecot.cafile))
    port = dovecot.tls_port if security == "tls" else dovecot.plain_port
    # Delivered with a bare client: shardworker's own clients never send a literal (APPEND).
    with imapclient.IMAPClient("localhost", dovecot.plain_port, ssl=False, timeout=7) as bare:
        bare.login(user.name, user.password)
        bare.append("INBOX", MESSAGE)
    with caplog.at_level(logging.DEBUG, logger="imapclient.imaplib"):
        client = open_client(
            "localhost", port, security, Credentials("password", user.name, user.password),
            timeout_s=7.0, connect_timeout_s=5.0, ssl_context=context,
        )  # fmt: skip
        try:
            client.select_folder("INBOX", readonly=True)
            fetched = client.fetch(client.search("ALL"), ["BODY.PEEK[]", "INTERNALDATE"])
        finally:
            close_client(client)
    assert [data[b"BODY[]"] for data in fetched.values()] == [MESSAGE]
    assert [r.getMessage() for r in caplog.records if r.name == "imapclient.imaplib"] == []
    assert client._imap.debug == 0
