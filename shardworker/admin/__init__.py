"""Provider management and admin operations: CLI, HTTP API and command delivery."""
