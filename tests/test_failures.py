"""The engine's failure policy: pure parts."""

from __future__ import annotations


def test_a_password_echoed_in_an_error_is_blanked() -> None:
    from shardworker.engine.failures import scrub_secret
    from shardworker.engine.state import ProviderRuntime
    from shardworker.imap.connect import Credentials

    rt = ProviderRuntime.__new__(ProviderRuntime)
    rt.credentials = Credentials("password", "bob", "hunter2-secret")
    text = scrub_secret("protocol: unexpected b'* BAD hunter2-secret'", rt)
    assert "hunter2" not in text and "***" in text
    rt.credentials = None
    assert scrub_secret("no secret here", rt) == "no secret here"
