"""`chatstream lag`: how far the persistence consumer is behind (see `server.consumer.lag`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence

import click

from server.cli.redisenv import RedisEnv, open_redis, redis_env
from server.consumer.lag import LagReport, measure_lag


def format_age(seconds: float | None) -> str:
    """A short human duration: ``-``, ``850ms``, ``12.3s``, ``4m05s``, ``2h03m``, ``3d04h``."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def format_table(report: LagReport) -> str:
    """The report as an aligned text table, one row per shard, then totals and dead letters."""
    header = (
        "shard",
        "stream",
        "length",
        "undelivered",
        "pending",
        "oldest undelivered",
        "oldest pending",
        "idle",
    )
    rows = [
        (
            str(s.shard),
            s.stream + ("" if s.group_exists else " (no group yet)"),
            str(s.length),
            f"{s.undelivered}{'+' if s.undelivered_capped else ''}",
            str(s.pending),
            format_age(s.oldest_undelivered_age_s),
            format_age(s.oldest_pending_age_s),
            format_age(s.oldest_pending_idle_s),
        )
        for s in report.shards
    ]
    capped = any(s.undelivered_capped for s in report.shards)
    rows.append(
        (
            "total",
            "",
            str(sum(s.length for s in report.shards)),
            f"{report.undelivered}{'+' if capped else ''}",
            str(report.pending),
            format_age(max((s.oldest_undelivered_age_s or 0.0 for s in report.shards), default=0.0) or None),
            format_age(max((s.oldest_pending_age_s or 0.0 for s in report.shards), default=0.0) or None),
            "",
        )
    )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    # Text columns left-aligned, numbers right-aligned.
    left = {0, 1}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i in left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    lines = [line(header), *(line(row) for row in rows)]
    measured = report.measured_at.strftime("%Y-%m-%d %H:%M:%SZ")
    lines.append(f"dead letters: {report.dead_letters}   (group {report.group}, measured {measured})")
    return "\n".join(lines)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one document per measurement).")
@click.option(
    "--watch",
    type=click.FloatRange(min=0.1),
    default=None,
    metavar="SECONDS",
    help="Measure again every SECONDS until Ctrl-C.",
)
def lag(as_json: bool, watch: float | None) -> None:
    """Show how far the persistence consumer is behind on each chat:turns:{k} shard.

    Needs only CHATSTREAM_REDIS_URL (and CHATSTREAM_SHARDS if not 4); without it, the Redis of
    the `chatstream dev` running for this folder. Columns: entries not yet delivered to the
    group chat-persistence, pending (delivered, not acknowledged), the age of the oldest of
    each, and how long the oldest pending one has been idle.
    """
    env = redis_env()
    # Ctrl-C is how --watch ends.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(env, as_json=as_json, watch_s=watch))


async def _run(env: RedisEnv, *, as_json: bool, watch_s: float | None) -> None:
    async with open_redis(env) as redis:
        while True:
            report = await measure_lag(redis, shards=env.shards)
            if as_json:
                # Watching prints one compact document per line (JSON Lines) for tools to follow.
                click.echo(json.dumps(report.to_json(), indent=None if watch_s else 2))
            else:
                if watch_s is not None:
                    click.clear()
                click.echo(format_table(report))
            if watch_s is None:
                return
            await asyncio.sleep(watch_s)
