#!/usr/bin/env bash
# make demo: a private Dovecot with demo mailboxes, providers registered, sample mail
# delivered, and every INBOUND_EMAIL_RECEIVED event printed as shardworker publishes it.
set -euo pipefail
cd "$(dirname "$0")/.."
exec env PYTHONPATH=. .venv/bin/python scripts/demo.py "$@"
