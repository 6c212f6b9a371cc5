"""Which database errors mean "PostgreSQL is unreachable for now", as opposed to "this statement is wrong".

The one family of outage errors of the one database path: asyncpg's, as SQLAlchemy wraps
them, and the socket errors under both. Outages are retried (UNAVAILABLE with RetryInfo,
unit of work 2's retries, the consumer's back-off); anything else is a bug.
"""

from __future__ import annotations

import asyncpg.exceptions
import sqlalchemy.exc

# asyncpg errors meaning "the server is gone, restarting or refusing connections":
# connection failures (SQLSTATE class 08) and operator intervention (57P01-57P03);
# no connection slot left (53300); a database not accepting connections (55000, e.g.
# ALLOW_CONNECTIONS false during maintenance); a primary that became a read-only
# standby in a failover (25006). All of them pass once the database is back, so
# they are retried like a refused connection (ConnectionRefusedError is an OSError).
_OUTAGE_ERRORS = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ObjectNotInPrerequisiteStateError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.InterfaceError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    ConnectionError,
    OSError,
)


def is_database_outage(exc: BaseException) -> bool:
    """True when ``exc`` means PostgreSQL is unreachable, not that a statement is wrong.

    SQLAlchemy wraps asyncpg's exceptions, so the whole cause chain is searched.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sqlalchemy.exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, _OUTAGE_ERRORS):
            return True
        current = current.__cause__ or current.__context__
    return False
