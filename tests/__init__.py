"""shardworker test suite (a package so bench/ can import tests.harness)."""
