"""Operator commands: ``requests show`` (what happened to a request) and ``failed list | replay |
purge`` (the parked requests). Registered on the main parser by :func:`register`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from aio_pika.exceptions import AMQPError, ChannelNotFoundEntity

from deployflag import exitcodes
from deployflag.errors import FatalError
from deployflag.parked import (
    FailedQueue,
    Parked,
    ReplayError,
    Selection,
    counts_by_reason,
    parse_duration,
)
from deployflag.settings import Settings
from deployflag.store.audit import RequestReport, mark_replayed, note_park
from deployflag.texttable import cell, render

Add = Callable[[str, Callable[..., int], str], argparse.ArgumentParser]


class OpsError(FatalError):
    """A one-line error with its exit code (the main parser prints it)."""


def _on_broker(run: Callable[[], int], settings: Settings) -> int:
    """Run a failed-queue command; an unreachable broker or a missing queue is one line, 69."""
    try:
        return run()
    except ChannelNotFoundEntity:
        raise OpsError(
            f"queue {settings.failed_queue} does not exist on this broker (vhost): "
            "check DEPLOYFLAG_AMQP_URL and DEPLOYFLAG_FAILED_QUEUE",
            exitcodes.RET_BROKER,
        ) from None
    except (OSError, AMQPError) as exc:
        raise OpsError(
            f"broker unavailable: {type(exc).__name__}: {exc}", exitcodes.RET_BROKER
        ) from None


def _print_json(data: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- requests show --------------------------------------------------------------------------


def _describe(report: RequestReport) -> str:
    lines = [
        f"request   {report.request_id}",
        f"repo      {report.repo_id or '-'}",
        f"status    {report.status} ({report.outcome})",
        f"attempts  {report.attempts}",
        f"first seen {_when(report.first_seen)}",
        f"finished  {_when(report.finished_at)}",
        f"result    {'stored' if report.result_stored else 'none stored'}",
    ]
    if report.reason or report.error:
        lines.append(f"reason    {report.reason or '-'}")
        lines.append(f"error     {report.error or '-'}")
    model = report.model
    if model is not None:
        trained = {True: "trained", False: "not trained", None: "-"}[model.trained]
        skipped = f" ({model.skipped_reason})" if model.skipped_reason else ""
        lines.append(
            f"model     {model.estimator or '-'}: {trained}{skipped}, AUC {cell(model.roc_auc)}, "
            f"precision {cell(model.precision)}, {cell(model.training_rows)} rows"
        )
    for park in report.parks:
        replayed = (
            f"replayed {_when(park.replayed_at)}" if park.replayed_at else "replay not confirmed"
        )
        lines.append(
            f"parked    {_when(park.parked_at)} {park.reason or '-'}: {park.error or '-'} "
            f"({replayed}, replay {park.replay_count})"
        )
    return "\n".join(lines)


async def _requests_show(args: argparse.Namespace, settings: Settings) -> int:
    from deployflag.store import Store
    from deployflag.store.audit import recent_requests, request_report

    store = await Store.open(settings)
    try:
        if args.repo is not None:
            reports = await recent_requests(store.engine, args.repo, args.last)
            if not reports:
                raise OpsError(
                    f"no requests of repository {args.repo} in the database",
                    exitcodes.RET_NOT_FOUND,
                )
        else:
            found = await request_report(store.engine, args.request_id)
            if found is None:
                raise OpsError(
                    f"no request {args.request_id} in the database "
                    "(never received here, or a different DEPLOYFLAG_DATABASE_URL)",
                    exitcodes.RET_NOT_FOUND,
                )
            reports = [found]
    finally:
        await store.close()
    if args.json:
        _print_json(
            [r.as_json() for r in reports] if args.repo is not None else reports[0].as_json()
        )
    else:
        print("\n\n".join(_describe(r) for r in reports))
    return exitcodes.RET_OK


def cmd_requests_show(args: argparse.Namespace, settings: Settings) -> int:
    if (args.request_id is None) == (args.repo is None):
        raise OpsError("give a request id, or --repo REPO_ID", exitcodes.RET_USAGE)
    return asyncio.run(_requests_show(args, settings))


# --- failed list ----------------------------------------------------------------------------


def _selection(args: argparse.Namespace) -> Selection:
    older = getattr(args, "older_than", None)
    try:
        older_than = None if older is None else parse_duration(older)
    except ValueError as exc:
        raise OpsError(str(exc), exitcodes.RET_USAGE) from None
    return Selection(
        reasons=frozenset(args.reason or ()),
        request_ids=frozenset(getattr(args, "request_id", None) or ()),
        older_than=older_than,
    )


def _lines(parked: list[Parked]) -> str:
    rows = [
        [
            p.request_id,
            p.repo_id,
            p.reason,
            p.size,
            p.kind,
            _when(p.parked_at),
            p.replays,
            p.error[:80],
        ]
        for p in parked
    ]
    headings = ["request id", "repo", "reason", "bytes", "kind", "parked", "replays", "error"]
    return render(headings, rows)


async def _failed_list(args: argparse.Namespace, settings: Settings) -> int:
    selected = _selection(args)
    async with FailedQueue(settings).open() as queue:
        everything = await queue.fetch_all()
        # leaving the block hands every message back to the queue
    chosen = [p for p in everything if selected(p)]
    shown = chosen if args.limit is None else chosen[: args.limit]
    counts = counts_by_reason(chosen)
    if args.json:
        _print_json(
            {
                "queue": settings.failed_queue,
                "total": len(chosen),
                "by_reason": dict(counts),
                "messages": [p.as_json() for p in shown],
            }
        )
        return exitcodes.RET_OK
    print(f"{len(chosen)} parked on {settings.failed_queue}")
    if counts:
        print(render(["reason", "count"], [list(c) for c in counts]))
        print()
        print(_lines(shown))
        if len(shown) < len(chosen):
            print(f"… {len(chosen) - len(shown)} more (raise --limit)")
    return exitcodes.RET_OK


def cmd_failed_list(args: argparse.Namespace, settings: Settings) -> int:
    return _on_broker(lambda: asyncio.run(_failed_list(args, settings)), settings)


# --- failed replay --------------------------------------------------------------------------


async def _replay_one(queue: FailedQueue, parked: Parked, engine: Any) -> str:
    """Keep the park, publish the request (unless an earlier run's copy was confirmed), ack."""
    key = parked.parked_at if parked.request_id is not None else None
    if engine is not None and key is not None and parked.request_id is not None:
        already = await note_park(
            engine,
            request_id=parked.request_id,
            repo_id=parked.repo_id,
            reason=parked.reason,
            error=parked.error,
            parked_at=key,
            replay_count=parked.replays + 1,
        )
        if already:
            await queue.drop(parked)
            return "already replayed (its copy was confirmed before): parked copy removed"
    await queue.republish(parked)
    if engine is not None and key is not None and parked.request_id is not None:
        await mark_replayed(
            engine, request_id=parked.request_id, parked_at=key, at=datetime.now(UTC)
        )
    await queue.drop(parked)
    return "replayed"


async def _failed_replay(args: argparse.Namespace, settings: Settings) -> int:
    from deployflag.store import Store

    selected = _selection(args)
    store = None if args.dry_run else await Store.open(settings)
    done = 0
    try:
        async with FailedQueue(settings).open() as queue:
            everything = await queue.fetch_all()
            chosen = [p for p in everything if selected(p)]
            picked = {id(p) for p in chosen}
            for parked in everything:
                if id(parked) not in picked:
                    await queue.release(parked)
            if args.dry_run:
                print(f"would replay {len(chosen)} of {len(everything)} parked messages")
                if chosen:
                    print(_lines(chosen))
                return exitcodes.RET_OK
            assert store is not None
            for parked in chosen:
                try:
                    outcome = await _replay_one(queue, parked, store.engine)
                except ReplayError as exc:
                    raise OpsError(
                        f"{exc}; replayed {done} before stopping, the rest stay parked",
                        exitcodes.RET_BROKER,
                    ) from None
                done += 1
                print(f"{parked.request_id or '-'} {parked.reason}: {outcome}", flush=True)
    finally:
        if store is not None:
            await store.close()
    print(f"replayed {done} to {settings.training_queue}", flush=True)
    return exitcodes.RET_OK


def cmd_failed_replay(args: argparse.Namespace, settings: Settings) -> int:
    if not (args.all or args.reason or args.request_id):
        raise OpsError(
            "say what to replay: --reason R, --request-id ID or --all", exitcodes.RET_USAGE
        )
    return _on_broker(lambda: asyncio.run(_failed_replay(args, settings)), settings)


# --- failed purge ---------------------------------------------------------------------------


def _confirm(question: str) -> bool:
    print(f"{question} [y/N] ", end="", flush=True)
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")


async def _failed_purge(args: argparse.Namespace, settings: Settings) -> int:
    selected = _selection(args)
    async with FailedQueue(settings).open() as queue:
        everything = await queue.fetch_all()
        chosen = [p for p in everything if selected(p)]
        picked = {id(p) for p in chosen}
        for parked in everything:
            if id(parked) not in picked:
                await queue.release(parked)
        if not chosen:
            print("nothing to purge")
            return exitcodes.RET_OK
        counts = ", ".join(f"{reason} {n}" for reason, n in counts_by_reason(chosen))
        if not args.yes and not _confirm(
            f"delete {len(chosen)} parked messages for good ({counts})?"
        ):
            print("nothing deleted")
            return exitcodes.RET_ERROR
        for parked in chosen:
            await queue.drop(parked)
    print(f"deleted {len(chosen)} parked messages")
    return exitcodes.RET_OK


def cmd_failed_purge(args: argparse.Namespace, settings: Settings) -> int:
    if not (args.all or args.reason or args.older_than):
        raise OpsError(
            "say what to purge: --reason R and/or --older-than AGE, or --all", exitcodes.RET_USAGE
        )
    return _on_broker(lambda: asyncio.run(_failed_purge(args, settings)), settings)


# --- registration ---------------------------------------------------------------------------


def register(add: Add) -> None:
    """Add the operator commands with ``add(name, handler, help)`` (as the main parser does)."""
    p = add(
        "requests",
        cmd_requests_show,
        "Show what happened to a request (from the database): status, attempts, outcome.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser(
        "show",
        help="one request by id, or a repository's latest requests",
        description="Exit 4 when the database knows no such request.",
    )
    show.set_defaults(handler=cmd_requests_show)
    show.add_argument("request_id", nargs="?", help="the request id (message id or task id)")
    show.add_argument("--repo", metavar="REPO_ID", help="the latest requests of this repository")
    show.add_argument("--last", type=int, default=10, help="how many with --repo (default 10)")
    show.add_argument("--json", action="store_true", help="JSON for scripts")

    p = add(
        "failed",
        cmd_failed_list,
        "Read, replay or purge the requests parked on the failed queue.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    ls = actions.add_parser(
        "list",
        help="counts by reason, then one line per message; every message stays on the queue",
    )
    ls.set_defaults(handler=cmd_failed_list)
    ls.add_argument("--reason", action="append", help="only this reason (repeatable)")
    ls.add_argument("--limit", type=int, help="at most this many message lines")
    ls.add_argument("--json", action="store_true", help="JSON for scripts")

    rp = actions.add_parser(
        "replay",
        help="send parked requests back to the training queue (confirmed before removal)",
        description=(
            "Republish parked requests to the training queue with their original body and "
            "properties; each parked copy is removed only after the broker confirmed the new "
            "one. The request's park is kept in the database, and it trains again from "
            "attempt 1. Exit 69 when the broker refuses a copy (the rest stay parked)."
        ),
    )
    rp.set_defaults(handler=cmd_failed_replay)
    rp.add_argument("--reason", action="append", help="replay this reason (repeatable)")
    rp.add_argument("--request-id", action="append", help="replay this request (repeatable)")
    rp.add_argument("--all", action="store_true", help="replay everything parked")
    rp.add_argument("--dry-run", action="store_true", help="list what would be replayed")

    pg = actions.add_parser(
        "purge",
        help="delete parked messages for good (asks first unless --yes)",
        description="Exit 1 when the question is answered no.",
    )
    pg.set_defaults(handler=cmd_failed_purge)
    pg.add_argument("--reason", action="append", help="only this reason (repeatable)")
    pg.add_argument("--older-than", metavar="AGE", help="parked longer ago than AGE (7d, 12h, 30m)")
    pg.add_argument("--all", action="store_true", help="every parked message")
    pg.add_argument("--yes", action="store_true", help="do not ask")
