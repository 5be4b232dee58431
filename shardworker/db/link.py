"""How a PostgreSQL connection notices a silent peer: the libpq parameters we set.

A partition drops packets; nothing is refused.  Without these, a query on a dropped link
waits for TCP's retransmission backoff (about 15 minutes on Linux), a connection attempt
for the kernel's SYN retries (about 2 minutes), and an idle pooled connection is never
found dead until it is used.  So every connection gets:

* ``connect_timeout``: the connection deadline (``SHARDWORKER_CONNECT_TIMEOUT_S``,
  rounded up to whole seconds; libpq's minimum is 2);
* ``tcp_user_timeout``: sent data left unacknowledged this long closes the connection
  (``SHARDWORKER_LEASE_TTL_S``: an owner whose PostgreSQL has been silent for a lease
  TTL cannot checkpoint and gives its leases up, see ``pool/dbwatch.py``; a query that
  merely runs long is acknowledged at the TCP level and is not affected);
* ``keepalives`` on, first probe after half that bound, then three probes spread over
  the other half, so an idle connection on a dead link is known dead within the bound.

A parameter the DSN sets itself keeps the DSN's value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from shardworker.config import Settings

KEEPALIVE_PROBES = 3


@dataclass(frozen=True)
class LinkTimeouts:
    """Bounds of a PostgreSQL connection: opening it, and a silent peer once open."""

    connect_s: float = 15.0
    silence_s: float = 8.0

    @classmethod
    def from_settings(cls, settings: Settings) -> LinkTimeouts:
        return cls(connect_s=settings.connect_timeout_s, silence_s=settings.lease_ttl_s)

    def params(self) -> dict[str, int]:
        """The libpq keywords, integers as libpq wants them (seconds; milliseconds for
        ``tcp_user_timeout``)."""
        idle_s = max(1, math.floor(self.silence_s / 2))
        interval_s = max(1, math.floor((self.silence_s - idle_s) / KEEPALIVE_PROBES))
        return {
            "connect_timeout": max(2, math.ceil(self.connect_s)),
            "tcp_user_timeout": max(1, round(self.silence_s * 1000)),
            "keepalives": 1,
            "keepalives_idle": idle_s,
            "keepalives_interval": interval_s,
            "keepalives_count": KEEPALIVE_PROBES,
        }


def link_params(dsn: str, link: LinkTimeouts) -> dict[str, int]:
    """``link``'s parameters that ``dsn`` does not set itself (to pass as connect kwargs)."""
    try:
        given = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        given = {}  # the connection attempt reports the malformed DSN, without its secrets
    return {k: v for k, v in link.params().items() if k not in given}


def link_conninfo(dsn: str, link: LinkTimeouts) -> str:
    """``dsn`` with ``link``'s parameters added (for a connection made outside a pool)."""
    return make_conninfo(dsn, **link_params(dsn, link))
