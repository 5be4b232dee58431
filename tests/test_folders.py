"""shardworker.imap.folders: filter matching on canned LIST results, then on Dovecot."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from shardworker.errors import ImapTransientError
from shardworker.imap.connect import Credentials, close_client, open_client, tls_context
from shardworker.imap.folders import FolderResolution, match_folders, resolve_folders
from tests.harness.dovecot import Dovecot

# What imapclient's list_folders() returns: (flags, delimiter, decoded name).
DOVECOT: list[tuple[tuple[bytes, ...], bytes, str]] = [
    ((b"\\HasNoChildren",), b"/", "INBOX"),
    ((b"\\HasNoChildren", b"\\Sent"), b"/", "Sent"),
    ((b"\\HasNoChildren", b"\\Junk"), b"/", "Junk"),
    ((b"\\HasNoChildren", b"\\Drafts"), b"/", "Entwürfe"),
    ((b"\\HasNoChildren", b"\\Trash"), b"/", "Papierkorb"),
    ((b"\\HasChildren",), b"/", "Projects"),
    ((b"\\HasNoChildren",), b"/", "Projects/2024"),
    ((b"\\HasNoChildren",), b"/", "日本語"),
    ((b"\\Noselect", b"\\HasChildren"), b"/", "Shared"),
]
GMAIL: list[tuple[tuple[bytes, ...], bytes, str]] = [
    ((b"\\HasNoChildren",), b"/", "INBOX"),
    ((b"\\HasChildren", b"\\Noselect"), b"/", "[Gmail]"),
    ((b"\\All", b"\\HasNoChildren"), b"/", "[Gmail]/All Mail"),
    ((b"\\HasNoChildren", b"\\Junk"), b"/", "[Gmail]/Spam"),
    ((b"\\HasNoChildren", b"\\Sent"), b"/", "[Gmail]/Sent Mail"),
    ((b"\\Flagged", b"\\HasNoChildren"), b"/", "[Gmail]/Starred"),
    ((b"\\HasNoChildren", b"\\Important"), b"/", "[Gmail]/Important"),
]
COURIER: list[tuple[tuple[bytes, ...], bytes, str]] = [
    ((b"\\HasChildren",), b".", "INBOX"),
    ((b"\\HasNoChildren",), b".", "INBOX.Sent"),
    ((b"\\HasNoChildren",), b".", "INBOX.Archive.2024"),
    ((b"\\NonExistent", b"\\HasNoChildren"), b".", "INBOX.Gone"),
]


def resolve(listing: list[Any], *filters: str) -> FolderResolution:
    return match_folders(listing, filters)


@pytest.mark.parametrize("filters", [(), ("",), ("  ",)])
def test_no_filters_means_inbox(filters: tuple[str, ...]) -> None:
    assert resolve(DOVECOT, *filters) == FolderResolution(("INBOX",), (), ())


@pytest.mark.parametrize("typed", ["INBOX", "inbox", "Inbox", " INBOX "])
def test_inbox_is_case_insensitive(typed: str) -> None:
    assert resolve(DOVECOT, typed).folders == ("INBOX",)


def test_names_match_exactly_then_ignoring_case() -> None:
    assert resolve(DOVECOT, "Projects/2024", "projects", "ENTWÜRFE", "日本語").folders == (
        "Projects/2024",
        "Projects",
        "Entwürfe",
        "日本語",
    )


def test_exact_name_beats_a_case_insensitive_one() -> None:
    listing = [*DOVECOT, ((b"\\HasNoChildren",), b"/", "projects")]
    assert resolve(listing, "projects", "Projects").folders == ("projects", "Projects")


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("\\Sent", "[Gmail]/Sent Mail"),
        ("\\junk", "[Gmail]/Spam"),
        ("\\All", "[Gmail]/All Mail"),
        ("\\Flagged", "[Gmail]/Starred"),
        ("\\Important", "[Gmail]/Important"),
        ("Sent", "[Gmail]/Sent Mail"),
        ("junk", "[Gmail]/Spam"),
        ("Spam", "[Gmail]/Spam"),
        ("all", "[Gmail]/All Mail"),
    ],
)
def test_special_use_flags_and_words(typed: str, expected: str) -> None:
    assert resolve(GMAIL, typed).folders == (expected,)


def test_a_folder_named_like_a_flag_wins_over_the_flag() -> None:
    listing = [*GMAIL, ((b"\\HasNoChildren",), b"/", "Sent")]
    assert resolve(listing, "sent", "\\Sent").folders == ("Sent", "[Gmail]/Sent Mail")


def test_special_use_on_dovecot_names() -> None:
    assert resolve(DOVECOT, "\\Drafts", "drafts", "Trash").folders == ("Entwürfe", "Papierkorb")


def test_missing_filters_and_flags_without_a_folder() -> None:
    result = resolve(DOVECOT, "INBOX", "Nope", "\\Archive", "archive")
    assert result == FolderResolution(("INBOX",), ("Nope", "\\Archive", "archive"), ())


def test_unselectable_folders_are_reported_apart() -> None:
    assert resolve(GMAIL, "[Gmail]", "INBOX") == FolderResolution(("INBOX",), (), ("[Gmail]",))
    assert resolve(COURIER, "INBOX.Gone").unselectable == ("INBOX.Gone",)


def test_duplicates_collapse_in_filter_order() -> None:
    result = resolve(GMAIL, "Spam", "INBOX", "\\Junk", "inbox", "x", "x")
    assert result == FolderResolution(("[Gmail]/Spam", "INBOX"), ("x",), ())


def test_slash_stands_for_the_server_delimiter() -> None:
    assert resolve(COURIER, "INBOX/Archive/2024", "inbox.sent").folders == (
        "INBOX.Archive.2024",
        "INBOX.Sent",
    )


def test_names_under_an_inbox_namespace_match_without_the_prefix() -> None:
    assert resolve(COURIER, "Sent", "archive/2024").folders == ("INBOX.Sent", "INBOX.Archive.2024")


def test_raw_bytes_names_are_decoded_from_modified_utf7() -> None:
    listing = [((b"\\HasNoChildren",), b"/", b"Entw&APw-rfe"), ((), None, b"&ZeVnLIqe-")]
    assert resolve(listing, "entwürfe", "日本語").folders == ("Entwürfe", "日本語")


# ---------------------------------------------------------------- real Dovecot

DOVECOT_FOLDERS = ("Sent", "Junk", "Entwürfe", "日本語", "Projects/2024", "Ünïcode & Co")


@pytest.fixture(scope="module")
def mailbox(dovecot: Dovecot) -> Iterator[Any]:
    """A logged-in client of a user owning DOVECOT_FOLDERS (the namespace flags Sent/Junk)."""
    user = dovecot.add_user()
    for name in DOVECOT_FOLDERS:
        dovecot.create_folder(user.name, name)
    client = open_client(
        dovecot.host, dovecot.plain_port, "starttls", Credentials("password", *user),
        timeout_s=10.0, connect_timeout_s=5.0, ssl_context=tls_context(str(dovecot.cafile)),
    )  # fmt: skip
    yield client
    close_client(client)


def test_dovecot_folders_resolve_and_can_be_examined(mailbox: Any) -> None:
    result = resolve_folders(
        mailbox, ["inbox", "entwürfe", "日本語", "projects/2024", "Ünïcode & Co", "\\Sent", "junk"]
    )
    assert result.folders == (
        "INBOX", "Entwürfe", "日本語", "Projects/2024", "Ünïcode & Co", "Sent", "Junk"
    )  # fmt: skip
    assert (result.missing, result.unselectable) == ((), ())
    for name in result.folders:
        assert mailbox.select_folder(name, readonly=True)[b"UIDVALIDITY"] > 0


def test_dovecot_missing_and_unselectable_folders(mailbox: Any) -> None:
    result = resolve_folders(mailbox, ["Nope", "Projects", "\\Archive", "\\Drafts", "Sent"])
    assert result == FolderResolution(("Sent",), ("Nope", "\\Archive", "\\Drafts"), ("Projects",))


def test_dovecot_special_use_names_the_flagged_folder(mailbox: Any) -> None:
    """No folder is named "spam": the word, like the flag, finds the folder flagged \\Junk."""
    assert resolve_folders(mailbox, ["spam", "\\JUNK"]).folders == ("Junk",)


def test_list_failure_is_classified(dovecot: Dovecot) -> None:
    user = dovecot.add_user()
    client = open_client(
        dovecot.host, dovecot.plain_port, "plain", Credentials("password", *user),
        timeout_s=10.0, connect_timeout_s=5.0, ssl_context=None,
    )  # fmt: skip
    client.shutdown()
    with pytest.raises(ImapTransientError) as info:
        resolve_folders(client, ["INBOX"])
    assert info.value.reason == "network"
