"""RSS at rest of ``chatstream serve --workers N``, per process, for checkouts side by side.

``.venv/bin/python -m bench.memory [--workers N] [--rounds R] CHECKOUT...``

For each round and each checkout (a folder holding a ``server`` package, put first on
PYTHONPATH), starts embedded PostgreSQL and Redis once, then the supervisor and its workers;
once every worker serves (its metrics port answers) and two more seconds have passed, reads
each process's RSS and PSS (``/proc/<pid>/smaps_rollup``; PSS splits shared pages between the
processes that map them), then stops them with SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of ``pid`` in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0]) / 1024
    return values["Rss"], values["Pss"]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return sorted(found)


def measure(checkout: Path, env: dict[str, str], workers: int) -> dict[str, tuple[float, float]]:
    """Starts the supervisor of ``workers`` from ``checkout``; returns each process's (RSS, PSS)."""
    metrics = _free_port()
    while not all(_free_port() != metrics + i for i in range(workers)):
        metrics = _free_port()
    env = env | {
        "PYTHONPATH": str(checkout),
        "CHATSTREAM_LISTEN": f"127.0.0.1:{_free_port()}",
        "CHATSTREAM_METRICS_LISTEN": f"127.0.0.1:{metrics}",
    }
    process = subprocess.Popen(
        [str(BIN / "chatstream"), "serve", "--workers", str(workers)], env=env, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while not all(_listening(metrics + i) for i in range(workers)):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve --workers {workers} did not start (status {process.poll()})")
            time.sleep(0.2)
        time.sleep(2)
        result = {"supervisor": _memory_mb(process.pid)}
        for i, pid in enumerate(_children(process.pid)):
            result[f"worker {i}"] = _memory_mb(pid)
        return result
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.memory")
    parser.add_argument("checkouts", nargs="+", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from server.db.migrate import upgrade
    from server.embedded import embedded_services

    with (
        tempfile.TemporaryDirectory(prefix="chatstream-memory-") as data,
        embedded_services(Path(data)) as svc,
    ):
        upgrade(svc.database_url)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATSTREAM_", "ANTHROPIC_"))}
        env |= {
            "CHATSTREAM_DATABASE_URL": svc.database_url,
            "CHATSTREAM_REDIS_URL": svc.redis_url,
            "ANTHROPIC_API_KEY": "bench",
            "CHATSTREAM_AUTH_MODE": "none",
            "CHATSTREAM_LOG_LEVEL": "WARNING",
        }
        runs: dict[Path, list[dict[str, tuple[float, float]]]] = {c: [] for c in args.checkouts}
        for round_ in range(args.rounds):
            for checkout in args.checkouts:
                run = measure(checkout, env, args.workers)
                runs[checkout].append(run)
                shown = ", ".join(f"{name} {rss:.1f}/{pss:.1f}" for name, (rss, pss) in run.items())
                print(f"round {round_} {checkout}: RSS/PSS MB: {shown}", flush=True)
        print(f"\nmedian of {args.rounds} rounds, RSS / PSS in MB:")
        for checkout, results in runs.items():
            names = results[0].keys()
            shown = ", ".join(
                f"{name} {statistics.median(r[name][0] for r in results):.1f}"
                f" / {statistics.median(r[name][1] for r in results):.1f}"
                for name in names
            )
            print(f"  {checkout}: {shown}")


if __name__ == "__main__":
    main()
