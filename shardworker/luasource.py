"""The one convention for Redis Lua: every script is a file in ``shardworker/lua/``.

Each file starts with a comment documenting its KEYS and ARGV; callers load it by name.
"""

from __future__ import annotations

from importlib import resources


def lua_source(name: str) -> str:
    """The text of ``shardworker/lua/<name>`` (package data, so it ships in the wheel)."""
    return resources.files("shardworker").joinpath("lua", name).read_text("utf-8")
