"""The INBOUND_EMAIL_RECEIVED payload: one shape that passes both of Alga's schemas."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def iso_utc(dt: datetime) -> str:
    """Millisecond ISO-8601 in UTC ending in ``Z`` (what zod's ``.datetime()`` accepts)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def build_payload(
    *, tenant: str, provider_id: str, email_data: dict[str, Any], occurred_at: datetime
) -> dict[str, Any]:
    """``{tenantId, tenant, providerId, occurredAt, emailData}`` in that key order.

    ``emailData`` also gets ``tenant`` and ``providerId`` (Shape B allows them; consumers
    that only see ``emailData`` then still know where it came from).  The caller's dict is
    not modified.
    """
    data = dict(email_data)
    data["tenant"] = tenant
    data["providerId"] = provider_id
    return {
        "tenantId": tenant,
        "tenant": tenant,
        "providerId": provider_id,
        "occurredAt": iso_utc(occurred_at),
        "emailData": data,
    }
