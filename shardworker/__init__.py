"""shardworker: sharded IMAP IDLE to Redis Streams ingestion for Alga PSA."""

__version__ = "0.1.0"
