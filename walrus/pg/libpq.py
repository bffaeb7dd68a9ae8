"""A plain SQL session over libpq: the distribution's libpq through ctypes, else psycopg's binding of its own."""
from __future__ import annotations

import functools
import os
import threading
from typing import Optional

# backup-push's session asks a handful of one-row questions, with every value as text. Importing
# psycopg for them costs 0.1 s of CPU (0.2 s from a cold cache) on every backup, more than a delta
# backup's own queries take; the distribution's libpq is called through ctypes instead (cffi's ABI
# mode would parse declarations at run time with pycparser, itself a third of that import), and
# psycopg's low-level binding of libpq (the same calls) serves where that library is not installed
# (a pip install with psycopg's binary wheel, which brings a libpq of its own).

CTYPES, PSYCOPG = "ctypes", "psycopg"
CLOSE_WAIT = 10.0  # seconds close() waits for a statement another thread runs on the session
# libpq waits for a server that does not answer for ever unless told: psycopg's bound, where neither
# the parameters nor PGCONNECT_TIMEOUT give one
DEFAULT_CONNECT_TIMEOUT = 130

_CONNECTION_OK = 0  # ConnStatusType
_COMMAND_OK, _TUPLES_OK = 1, 2  # ExecStatusType

Row = tuple  # of str | None, one per column


class SessionError(Exception):
    """libpq's message for a connection or a statement that failed."""


@functools.cache
def _libpq():
    """The distribution's libpq 5 with the prototypes of the calls made here, or None when it is not installed."""
    import ctypes

    try:
        lib = ctypes.CDLL("libpq.so.5")  # ctypes releases the GIL during each call: a connect blocks no thread
    except OSError:
        return None
    p, i, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
    strings = ctypes.POINTER(ctypes.c_char_p)
    for name, result, args in (
            ("PQconnectdbParams", p, (strings, strings, i)), ("PQstatus", i, (p,)), ("PQerrorMessage", s, (p,)),
            ("PQfinish", None, (p,)), ("PQexecParams", p, (p, s, i, p, strings, p, p, i)),
            ("PQresultStatus", i, (p,)), ("PQresultErrorMessage", s, (p,)), ("PQntuples", i, (p,)),
            ("PQnfields", i, (p,)), ("PQgetvalue", p, (p, i, i)), ("PQgetlength", i, (p, i, i)),
            ("PQgetisnull", i, (p, i, i)), ("PQclear", None, (p,))):
        function = getattr(lib, name)
        function.restype, function.argtypes = result, args
    return ctypes, lib


def default_binding() -> str:
    return CTYPES if _libpq() is not None else PSYCOPG


class Session:
    """One connection in autocommit mode (every statement its own transaction), as libpq makes it:
    parameters given here first, then PG* variables, ~/.pgpass, then libpq's defaults. Threads take
    turns: a statement runs whole before the next, and close() waits for one running."""

    def __init__(self, params: dict[str, str], binding: Optional[str] = None):
        params = {"application_name": "walrus", "client_encoding": "UTF8",
                  **{k: str(v) for k, v in params.items() if v is not None}}
        if "connect_timeout" not in params and not os.environ.get("PGCONNECT_TIMEOUT"):
            params["connect_timeout"] = str(DEFAULT_CONNECT_TIMEOUT)
        binding = binding or default_binding()
        self._impl: _Ctypes | _Psycopg | None = _Ctypes(params) if binding == CTYPES else _Psycopg(params)
        self._turn = threading.Lock()

    def query(self, sql: str, params: tuple = ()) -> list[Row]:
        """The statement's rows, every value as text (None for NULL); parameters are sent as text."""
        with self._turn:
            if self._impl is None:
                raise SessionError("the session is closed")
            return self._impl.query(sql, [str(p).encode() for p in params])

    def one(self, sql: str, params: tuple = ()) -> Row:
        rows = self.query(sql, params)
        if len(rows) != 1:
            raise SessionError(f"expected one row, got {len(rows)}: {sql}")
        return rows[0]

    def close(self, wait: float = CLOSE_WAIT) -> None:
        """Ends the connection once no statement runs on it. One still running on another thread
        after `wait` seconds keeps it (the process's exit ends it): freeing a connection libpq is
        using would crash the process."""
        if not self._turn.acquire(timeout=wait):
            return
        try:
            impl, self._impl = self._impl, None
            if impl is not None:
                impl.close()
        finally:
            self._turn.release()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").strip()


class _Ctypes:
    def __init__(self, params: dict[str, str]):
        binding = _libpq()
        if binding is None:
            raise SessionError("libpq.so.5 cannot be loaded")
        self._ctypes, self._lib = ctypes, lib = binding
        keywords = (ctypes.c_char_p * (len(params) + 1))(*(k.encode() for k in params), None)
        values = (ctypes.c_char_p * (len(params) + 1))(*(v.encode() for v in params.values()), None)
        self._conn = lib.PQconnectdbParams(keywords, values, 0)
        if not self._conn:
            raise SessionError("libpq could not allocate a connection")
        if lib.PQstatus(self._conn) != _CONNECTION_OK:
            message = _text(lib.PQerrorMessage(self._conn))
            self.close()
            raise SessionError(message)

    def query(self, sql: str, params: list[bytes]) -> list[Row]:
        ctypes, lib = self._ctypes, self._lib
        values = (ctypes.c_char_p * len(params))(*params) if params else None
        res = lib.PQexecParams(self._conn, sql.encode(), len(params), None, values, None, None, 0)
        if not res:
            raise SessionError(_text(lib.PQerrorMessage(self._conn)))
        try:
            if lib.PQresultStatus(res) not in (_COMMAND_OK, _TUPLES_OK):
                raise SessionError(_text(lib.PQresultErrorMessage(res)))
            columns = range(lib.PQnfields(res))
            return [tuple(None if lib.PQgetisnull(res, r, c) else
                          ctypes.string_at(lib.PQgetvalue(res, r, c), lib.PQgetlength(res, r, c)).decode()
                          for c in columns)
                    for r in range(lib.PQntuples(res))]
        finally:
            lib.PQclear(res)

    def close(self) -> None:  # once: Session forgets it
        self._lib.PQfinish(self._conn)


class _Psycopg:
    def __init__(self, params: dict[str, str]):
        from psycopg import Error, pq
        from psycopg.conninfo import make_conninfo

        self._pq, self._error = pq, Error
        self._conn = pq.PGconn.connect(make_conninfo(**params).encode())
        if self._conn.status != pq.ConnStatus.OK:
            message = _text(self._conn.error_message)
            self.close()
            raise SessionError(message)

    def query(self, sql: str, params: list[bytes]) -> list[Row]:
        try:
            res = self._conn.exec_params(sql.encode(), params)
        except self._error as e:  # no result at all: the connection is lost
            raise SessionError(str(e).strip()) from None
        try:
            if res.status not in (self._pq.ExecStatus.COMMAND_OK, self._pq.ExecStatus.TUPLES_OK):
                raise SessionError(_text(res.error_message))
            return [tuple(None if (v := res.get_value(r, c)) is None else bytes(v).decode()
                          for c in range(res.nfields))
                    for r in range(res.ntuples)]
        finally:
            res.clear()

    def close(self) -> None:  # once: Session forgets it
        self._conn.finish()


def parse_oid_array(text: Optional[str]) -> list[int]:
    """An oid[] (or int[]) value as text, '{1,2}', as its numbers."""
    if not text or text == "{}":
        return []
    return [int(n) for n in text.strip("{}").split(",")]
