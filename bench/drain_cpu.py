"""CPU per drained turn, consumer and PostgreSQL apart, for two checkouts in one sitting.

``.venv/bin/python -m bench.drain_cpu [--turns N] [--rounds R] CHECKOUT...``

P5's wall-clock drain moves by tens of percent when other tenants take the machine's two
cores; CPU time moves far less. For each round and each checkout (a folder holding a
``server`` package; it is put first on PYTHONPATH of ``chatstream consume``), this fills
P5's backlog (``bench.backlog.fill``) into embedded PostgreSQL and Redis, runs
``chatstream consume --burst --no-relay`` and reports the consumer's CPU (user + system,
from wait4) and PostgreSQL's (every postgres process, from /proc) per turn, and the wall
time. The consumer's start-up is measured once per checkout on empty streams and taken off.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from bench import backlog
from bench.common import asyncpg_dsn

BIN = Path(sys.executable).parent
_TICK = os.sysconf("SC_CLK_TCK")


def _postgres_cpu_s() -> float:
    """User + system CPU of every postgres process so far, the exited backends included.

    A backend's CPU is counted in its own /proc entry while it lives, then in the
    postmaster's children's times once it has exited and been reaped.
    """
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / _TICK


def _consume(checkout: Path, env: dict[str, str], profile: Path | None = None) -> tuple[float, float]:
    """Runs one burst (under py-spy, into ``profile``); returns (wall s, consumer CPU s)."""
    env = {**env, "PYTHONPATH": str(checkout)}
    argv = [str(BIN / "chatstream"), "consume", "--burst", "--no-relay"]
    if profile is not None:
        # py-spy's own CPU is in the children's times; only the profile is of use then.
        argv = [
            str(BIN / "py-spy"),
            "record",
            "--rate",
            "250",
            "--format",
            "raw",
            "-o",
            str(profile),
            "--",
            *argv,
        ]
    t0 = time.monotonic()
    process = subprocess.Popen(argv, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"consume --burst exited with {process.returncode}")
    return time.monotonic() - t0, usage.ru_utime + usage.ru_stime


async def _reset(dsn: str, redis_url: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE chat.messages, chat.turns, chat.conversations")
    finally:
        await conn.close()
    redis = aioredis.from_url(redis_url)
    try:
        await redis.flushdb()
    finally:
        await redis.aclose()


async def _fill(dsn: str, redis_url: str, turns: int) -> None:
    """P5's backlog: 4 shards, 4 turns per conversation, 20-token replies."""
    await backlog.fill(dsn, redis_url, shards=4, n_turns=turns, turns_per_conversation=4, reply_tokens=20)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.drain_cpu")
    parser.add_argument("checkouts", nargs="+", type=Path)
    parser.add_argument("--turns", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--profile", type=Path, help="one more drain per checkout under py-spy, into this folder"
    )
    args = parser.parse_args()
    from server.db.migrate import upgrade
    from server.embedded import embedded_services

    with (
        tempfile.TemporaryDirectory(prefix="chatstream-drain-") as data,
        embedded_services(Path(data)) as svc,
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATSTREAM_", "ANTHROPIC_"))}
        env |= {
            "CHATSTREAM_DATABASE_URL": svc.database_url,
            "CHATSTREAM_REDIS_URL": svc.redis_url,
            "ANTHROPIC_API_KEY": "bench",
            "CHATSTREAM_LOG_LEVEL": "WARNING",
        }
        os.environ["CHATSTREAM_DATABASE_URL"] = svc.database_url
        upgrade(svc.database_url)
        dsn = asyncpg_dsn(svc.database_url)
        startup = {c: min(_consume(c, env)[1] for _ in range(2)) for c in args.checkouts}
        results: dict[Path, list[tuple[float, float, float]]] = {c: [] for c in args.checkouts}
        for round_ in range(args.rounds):
            for checkout in args.checkouts:
                asyncio.run(_reset(dsn, svc.redis_url))
                asyncio.run(_fill(dsn, svc.redis_url, args.turns))
                pg0 = _postgres_cpu_s()
                wall_s, cpu_s = _consume(checkout, env)
                pg_s = _postgres_cpu_s() - pg0
                results[checkout].append((wall_s, cpu_s - startup[checkout], pg_s))
                print(
                    f"round {round_} {checkout}: wall {wall_s:.2f} s, consumer CPU {cpu_s:.2f} s "
                    f"(start-up {startup[checkout]:.2f} s), postgres CPU {pg_s:.2f} s",
                    flush=True,
                )
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            for i, checkout in enumerate(args.checkouts):
                asyncio.run(_reset(dsn, svc.redis_url))
                asyncio.run(_fill(dsn, svc.redis_url, args.turns))
                _consume(checkout, env, args.profile / f"drain-{i}-{checkout.name}.txt")
        print(f"\nper turn, median of {args.rounds} rounds of {args.turns} turns:")
        for checkout, runs in results.items():
            consumer_us = statistics.median(r[1] for r in runs) / args.turns * 1e6
            postgres_us = statistics.median(r[2] for r in runs) / args.turns * 1e6
            wall_s = statistics.median(r[0] for r in runs)
            print(
                f"  {checkout}: consumer {consumer_us:.1f} µs, postgres {postgres_us:.1f} µs, "
                f"burst wall {wall_s:.2f} s (start-up included)"
            )


if __name__ == "__main__":
    main()
