"""Command-line entry point: ``shardworker <command>``.

Each command loads settings first, so a bad ``SHARDWORKER_*`` variable stops every
command with the same clear message.  Heavy modules are imported inside the commands
that need them, so ``--help`` and ``print-config`` stay fast.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

import orjson

from shardworker import __version__
from shardworker.admin.cli import add_provider_commands
from shardworker.config import Settings, load_settings, settings_table
from shardworker.errors import ConfigError, DependencyUnavailableError, ShardworkerError
from shardworker.exitcodes import ExitCode
from shardworker.redact import redact_configured

Command = Callable[[argparse.Namespace, Settings], int]


def cmd_print_config(args: argparse.Namespace, settings: Settings) -> int:
    if args.table:
        sys.stdout.write(settings_table())
    else:
        sys.stdout.write(orjson.dumps(settings.redacted(), option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
    return ExitCode.OK


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from shardworker.db.migrate import migrate

    changes = migrate(settings.database_url)
    for change in changes:
        print(f"migrate: {change}")
    print("migrate: schema is up to date" if not changes else f"migrate: {len(changes)} change(s)")
    return ExitCode.OK


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    from shardworker.secrets.crypto import generate_key_setting

    if args.keys_command == "generate":
        print(generate_key_setting(args.kid))
        return ExitCode.OK
    from shardworker.db.store import open_pool
    from shardworker.secrets.store import SecretStore

    with open_pool(settings.database_url, max_size=2) as pool:
        count = SecretStore(settings, pool).rotate_keys()
    print(f"keys rotate: re-encrypted {count} secret(s) with the newest key")
    return ExitCode.OK


def cmd_check_health(args: argparse.Namespace, settings: Settings) -> int:
    host, _, port = settings.metrics_addr.rpartition(":")
    host = "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host
    url = f"http://{host}:{port}/{'readyz' if args.ready else 'healthz'}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            body = response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {url} answered {exc.code}", file=sys.stderr)
        return ExitCode.UNHEALTHY
    except OSError as exc:
        print(f"unhealthy: {url} unreachable ({exc})", file=sys.stderr)
        return ExitCode.UNHEALTHY
    print(body.strip())
    return ExitCode.OK


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from shardworker.runner import run

    return run(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardworker",
        description="Sharded IMAP IDLE to Redis Streams ingestion for Alga PSA.",
    )
    parser.add_argument("--version", action="version", version=f"shardworker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="serve every active IMAP provider (coordinator + workers)")
    run.set_defaults(func=cmd_run)

    migrate = sub.add_parser("migrate", help="create or verify the database schema")
    migrate.set_defaults(func=cmd_migrate)

    show = sub.add_parser("print-config", help="print effective settings, secrets redacted")
    show.add_argument("--table", action="store_true", help="print the README settings table")
    show.set_defaults(func=cmd_print_config)

    keys = sub.add_parser("keys", help="manage secret encryption keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    keys_sub.add_parser("rotate", help="re-encrypt every stored secret with the newest key")
    generate = keys_sub.add_parser("generate", help="print a new key entry for SECRET_KEYS")
    generate.add_argument("--kid", default="k1", help="key id to put in front of the key")
    keys.set_defaults(func=cmd_keys)

    health = sub.add_parser("check-health", help="probe the local health endpoint")
    health.add_argument("--ready", action="store_true", help="check /readyz, not /healthz")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(func=cmd_check_health)

    # Imported at the top: a missing dependency of the provider commands fails loudly.
    add_provider_commands(sub)
    return parser


def _undecodable_argument(argv: Sequence[str]) -> int | None:
    """The 1-based position of an argument the OS handed over as undecodable bytes."""
    for position, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return position
    return None


def main(argv: Sequence[str] | None = None) -> int:
    undecodable = _undecodable_argument(sys.argv[1:] if argv is None else argv)
    if undecodable is not None:
        print(f"shardworker: argument {undecodable} is not valid UTF-8", file=sys.stderr)
        return ExitCode.CONFIG
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        code: int = args.func(args, settings)
    except ConfigError as exc:
        print(f"shardworker: configuration error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except DependencyUnavailableError as exc:
        print(f"shardworker: dependency unavailable: {exc}", file=sys.stderr)
        return ExitCode.DEPENDENCY_UNAVAILABLE
    except ShardworkerError as exc:
        print(f"shardworker: {type(exc).__name__}: {redact_configured(str(exc))}",
              file=sys.stderr)  # fmt: skip
        return ExitCode.FAILURE
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    return code
