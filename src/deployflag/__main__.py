"""The command line: serve · run · backtest · submit · migrate · healthcheck · generate.

Errors are one line on stderr with a named exit code (deployflag.exitcodes), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import orjson

from deployflag import __version__, exitcodes, logs
from deployflag.errors import FatalError, InvalidRequest, TransientError
from deployflag.redaction import redact
from deployflag.settings import ConfigError, Settings, load_settings


class CommandError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _read_payload(path: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise CommandError(
            f"cannot read {path}: {exc.strerror or exc}", exitcodes.RET_NO_INPUT
        ) from None


# --- commands ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from deployflag.service import serve

    logs.configure(settings.log_format, settings.log_level)
    return asyncio.run(serve(settings))


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from deployflag import pipeline
    from deployflag.messages import TrainingResult

    body = _read_payload(args.payload)
    try:
        computation = pipeline.run(body, settings.pipeline_config())
    except InvalidRequest as exc:
        raise CommandError(
            f"invalid payload ({exc.reason}): {exc.message}", exitcodes.RET_INVALID_INPUT
        ) from None
    result = TrainingResult(
        **computation.model_dump(),
        request_id=args.request_id or hashlib.sha256(body).hexdigest(),
        deployflag_version=__version__,
        finished_at=datetime.now(UTC),
    )
    if args.store:
        asyncio.run(_store_result(settings, result))
    option = 0 if args.compact else orjson.OPT_INDENT_2
    sys.stdout.buffer.write(orjson.dumps(result.model_dump(mode="json"), option=option) + b"\n")
    return exitcodes.RET_OK


async def _store_result(settings: Settings, result: object) -> None:
    from deployflag.messages import TrainingResult
    from deployflag.store.repository import Store

    assert isinstance(result, TrainingResult)
    store = await Store.open(settings)
    try:
        await store.claim(result.request_id, result.repo_id)
        await store.record_result(result, settings.pipeline_config())
    finally:
        await store.close()


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from deployflag.submit import submit

    if args.celery and args.wait:
        raise CommandError(
            "--wait needs JSON requests: replies to Celery requests go to the result queue, "
            "where the upstream consumes them",
            exitcodes.RET_USAGE,
        )
    body = _read_payload(args.payload)
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise CommandError(
            f"{args.payload} is not JSON: {exc}", exitcodes.RET_INVALID_INPUT
        ) from None
    return asyncio.run(
        submit(
            settings,
            body,
            count=args.count,
            wait=args.wait,
            celery=args.celery,
            timeout=args.timeout,
            same_id=args.same_id,
        )
    )


def cmd_backtest(args: argparse.Namespace, settings: Settings) -> int:
    from deployflag.backtest_cli import render_table
    from deployflag.messages import parse_request
    from deployflag.pipeline import backtest

    body = _read_payload(args.payload)
    try:
        report = backtest.run(parse_request(body), settings.pipeline_config())
    except InvalidRequest as exc:
        raise CommandError(
            f"invalid payload ({exc.reason}): {exc.message}", exitcodes.RET_INVALID_INPUT
        ) from None
    if args.format == "json":
        data = orjson.dumps(report.model_dump(mode="json"), option=orjson.OPT_INDENT_2)
        sys.stdout.buffer.write(data + b"\n")
    else:
        print(render_table(report))
    return exitcodes.RET_OK


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from deployflag.store import migrate

    if args.downgrade:
        asyncio.run(migrate.downgrade(settings, args.downgrade))
        print(f"downgraded {redact(settings.db_url)} to {args.downgrade}")
    else:
        asyncio.run(migrate.upgrade(settings, args.revision))
        print(f"upgraded {redact(settings.db_url)} to {args.revision}")
    return exitcodes.RET_OK


def cmd_healthcheck(args: argparse.Namespace, settings: Settings) -> int:
    from deployflag.healthcheck import check

    return check(settings, timeout=args.timeout)


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from deployflag.synthetic import generate

    payload = generate(args.size, seed=args.seed, never_fixed=args.never_fixed)
    data = orjson.dumps(payload)
    if args.output and args.output != "-":
        Path(args.output).write_bytes(data)
    else:
        sys.stdout.buffer.write(data + b"\n")
    return exitcodes.RET_OK


# --- parser -----------------------------------------------------------------------------------

EPILOG = """exit codes: 0 ok · 1 failed (healthcheck: not ready) · 2 usage · 65 invalid payload ·
66 unreadable input · 69 broker unavailable · 70 internal error · 75 database unavailable ·
78 configuration error. Settings: DEPLOYFLAG_* variables and .env (see docs/settings.md)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deployflag",
        description="Per-repository issue weights from fix-rate history, served over RabbitMQ.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"deployflag {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[..., int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=EPILOG)
        p.set_defaults(handler=handler)
        return p

    add("serve", cmd_serve, "Consume training requests from RabbitMQ until SIGTERM/SIGINT.")

    p = add("run", cmd_run, "Compute the weights of one request offline (no broker).")
    p.add_argument("payload", help="request JSON file, or - for standard input")
    p.add_argument("--store", action="store_true", help="also record the run in the database")
    p.add_argument("--request-id", help="request id to record (default: SHA-256 of the body)")
    p.add_argument("--compact", action="store_true", help="one line of JSON")

    p = add("submit", cmd_submit, "Publish a request as the upstream would.")
    p.add_argument("payload", help="request JSON file, or - for standard input")
    p.add_argument("--count", type=int, default=1, help="how many copies (distinct ids)")
    p.add_argument("--same-id", action="store_true", help="give every copy the same id")
    p.add_argument("--wait", action="store_true", help="wait for the replies and print them")
    p.add_argument("--celery", action="store_true", help="send Celery protocol-2 task messages")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for replies")

    p = add(
        "backtest",
        cmd_backtest,
        "Would each scoring have predicted what happened? Weights from the first 80 %% of the "
        "payload's time span against each shortcode's fixes after it (no broker, no database).",
    )
    p.add_argument("payload", help="request JSON file, or - for standard input")
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = add("migrate", cmd_migrate, "Upgrade the database schema (Alembic).")
    p.add_argument("--revision", default="head", help="target revision (default: head)")
    p.add_argument("--downgrade", metavar="REV", help="downgrade to REV instead (e.g. base)")

    p = add("healthcheck", cmd_healthcheck, "Exit 0 when the running service is ready.")
    p.add_argument("--timeout", type=float, default=3.0)

    p = add("generate", cmd_generate, "Write a synthetic request (for demos and benchmarks).")
    p.add_argument("--size", choices=["small", "reference", "large"], default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--never-fixed", action="store_true", help="no fix ever: no model trains")
    p.add_argument("-o", "--output", help="file to write (default: standard output)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        code: int = args.handler(args, settings)
        return code
    except ConfigError as exc:
        print(f"deployflag: configuration error: {exc}", file=sys.stderr)
        return exitcodes.RET_CONFIG
    except CommandError as exc:
        print(f"deployflag: {exc}", file=sys.stderr)
        return exc.code
    except FatalError as exc:
        print(f"deployflag: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except TransientError as exc:
        print(f"deployflag: {redact(str(exc))}", file=sys.stderr)
        return exitcodes.RET_DATABASE
    except KeyboardInterrupt:
        return exitcodes.RET_INTERRUPTED
    except Exception as exc:  # a bug: one line here, the traceback in the log (and Sentry)
        from deployflag import sentry

        logs.get_logger().exception("internal error")
        sentry.capture(exc, request_id=None, repo_id=None)
        sentry.flush()
        print(
            f"deployflag: internal error: {type(exc).__name__}: {redact(str(exc))}", file=sys.stderr
        )
        return exitcodes.RET_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
