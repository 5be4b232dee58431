"""The sharded pool: membership, provider assignment, leases with fencing, the coordinator.

``assign`` is the pure planning step (consistent hashing with bounded loads); everything
that talks to Redis or PostgreSQL lives in its own module next to it.
"""
