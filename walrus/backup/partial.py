"""Partial restore (WAL-G's --restore-only): the DatabasesByNames backup-push records, and the files a restore keeps."""
from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

from walrus.config import Settings
from walrus.errors import BackupError, CorruptObject
from walrus.log import log
from walrus.pg.client import conninfo_kwargs
from walrus.pg.libpq import Session, SessionError, parse_oid_array

# FirstNormalObjectId (WAL-G's systemIDLimit): initdb made every database and relation below it
# (template1, template0, postgres; the catalogs, their indexes and TOAST); users' objects are above.
SYSTEM_OID_LIMIT = 16384

_DATABASES_SQL = ("SELECT oid, datname, datname OPERATOR(pg_catalog.=) pg_catalog.current_database()"
                  " FROM pg_catalog.pg_database WHERE datallowconn")
# Databases whose relations are read at once, each on a connection of its own for a moment: a
# cluster of many databases is not read one connection after another at the end of every backup.
CATALOG_SESSIONS = 4

# One row per relation: oid, file number (0 for a mapped catalog, whose file the path names, as
# WAL-G reads it; NULL path: no storage), "schema.name", kind, its inheritance parents, and the
# relation it belongs to: an index's table, a TOAST table's table, a sequence's owning table.
_RELATIONS_SQL = """
SELECT c.oid, c.relfilenode,
       CASE WHEN c.relfilenode OPERATOR(pg_catalog.=) 0 THEN pg_catalog.pg_relation_filepath(c.oid) END,
       n.nspname OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) c.relname, c.relkind,
       ARRAY(SELECT i.inhparent FROM pg_catalog.pg_inherits i WHERE i.inhrelid OPERATOR(pg_catalog.=) c.oid),
       COALESCE(x.indrelid, t.oid, d.refobjid)
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
LEFT JOIN pg_catalog.pg_index x ON x.indexrelid OPERATOR(pg_catalog.=) c.oid
LEFT JOIN pg_catalog.pg_class t ON c.relkind OPERATOR(pg_catalog.=) 't'
     AND t.reltoastrelid OPERATOR(pg_catalog.=) c.oid
LEFT JOIN pg_catalog.pg_depend d ON c.relkind OPERATOR(pg_catalog.=) 'S'
     AND d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
     AND d.objid OPERATOR(pg_catalog.=) c.oid
     AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
     AND d.deptype OPERATOR(pg_catalog.=) ANY ('{a,i}')
"""

Row = tuple  # (oid, relfilenode, path | None, "schema.name", relkind, [parent oids], owner oid | None)


# ---------------------------------------------------------------- backup-push: recording names


def tables_new(rows: Iterable[Row]) -> dict[str, Any]:
    """One database's WAL-G `tables_new`: every relation with storage (and every partitioned table,
    which WAL-G lists to reach its partitions) that has no inheritance parent, by "schema.name",
    with its `subtables`: what is restored with it. WAL-G's are its inheritance descendants; walrus
    adds their indexes, TOAST tables and owned sequences, so that a restored table can be used."""
    relations: dict[int, tuple[str, int]] = {}
    inherited: set[int] = set()
    belongs: dict[int, list[int]] = defaultdict(list)  # oid -> the oids restored with it
    for oid, filenode, path, name, kind, parents, owner in rows:
        if filenode == 0 and kind != "p":
            if path is None:
                continue  # no storage: a view, a partitioned index, a foreign table...
            filenode = int(path.rsplit("/", 1)[1])
        relations[oid] = (name, filenode)
        for parent in parents:
            belongs[parent].append(oid)
        if parents:
            inherited.add(oid)
        if owner is not None:
            belongs[owner].append(oid)
    out = {}
    for oid, (name, filenode) in sorted(relations.items(), key=lambda item: item[1][0]):
        if oid in inherited:
            continue  # a partition or child is a subtable of its root, as in WAL-G
        entry: dict[str, Any] = {"oid": oid, "relfilenode": filenode}
        subs, stack, seen = {}, list(belongs[oid]), {oid}
        while stack:
            sub = stack.pop()
            if sub not in seen and sub in relations:
                seen.add(sub)
                subs[relations[sub][0]] = {"oid": sub, "relfilenode": relations[sub][1]}
                stack.extend(belongs[sub])
        if subs:
            entry["subtables"] = dict(sorted(subs.items()))
        out[name] = entry
    return out


def _connect(settings: Settings, dbname: str | None) -> Session:
    return Session(conninfo_kwargs(settings) | ({"dbname": dbname} if dbname is not None else {}))


def _query(conn: Session, sql: str) -> list:
    try:
        return conn.query(sql)
    finally:
        conn.close()


def _relation(row: tuple) -> Row:
    """_RELATIONS_SQL's row, its values as text, as a Row."""
    oid, filenode, path, name, kind, parents, owner = row
    return int(oid), int(filenode), path, name, kind, parse_oid_array(parents), None if owner is None else int(owner)


def collect_databases_by_names(settings: Settings, connect: Callable[[Settings, str | None], Session] = _connect,
                               listing: Session | None = None) -> dict[str, Any]:
    """WAL-G's DatabasesByNames: each database that allows connections, by name, with its
    relations. One that refuses walrus is left out with a warning, as WAL-G leaves it out.
    `listing`: an open session (backup-push's own) that lists the databases and reads its own
    database's relations; the others are read CATALOG_SESSIONS at a time."""
    lister = listing if listing is not None else connect(settings, None)
    try:
        databases = sorted(lister.query(_DATABASES_SQL), key=lambda row: row[1])
        own = next((name for _, name, current in databases if current == "t"), None) if listing is not None else None
        own_tables = tables_new(map(_relation, listing.query(_RELATIONS_SQL))) if own is not None else None
    finally:
        if listing is None:
            lister.close()

    def read(name: str) -> dict[str, Any] | None:
        if name == own:
            return own_tables
        try:
            conn = connect(settings, name)
        except SessionError as e:
            log.warning(f"partial restore: cannot connect to database {name!r}, left out of DatabasesByNames "
                        f"(a partial restore will restore it whole): {e}")
            return None
        return tables_new(map(_relation, _query(conn, _RELATIONS_SQL)))

    with ThreadPoolExecutor(max_workers=CATALOG_SESSIONS, thread_name_prefix="walrus-catalog") as pool:
        tables = list(pool.map(read, [name for _, name, _ in databases]))
    return {name: {"oid": int(oid), **({"tables_new": found} if found else {})}
            for (oid, name, _), found in zip(databases, tables) if found is not None}


async def databases_by_names(settings: Settings, session: Any = None,
                             connect: Callable = _connect) -> dict[str, Any] | None:
    """collect_databases_by_names on a thread, or None with a warning: failing here never fails the
    backup, which is whole; only its partial restore is lost (WAL-G would fail the backup).
    `session`: backup-push's PgSession, whose connection (`sql`) lists the databases."""
    began = time.monotonic()
    try:
        names = await asyncio.to_thread(collect_databases_by_names, settings, connect, getattr(session, "sql", None))
    except Exception as e:  # whatever it is: the backup's data is already stored
        why = str(e).strip() or type(e).__name__
        log.warning(f"could not record database and table names (DatabasesByNames): {why}; "
                    "the backup is complete, but backup-fetch --restore-only cannot restore part of it")
        return None
    log.info(f"recorded the relations of {len(names)} databases for partial restore "
             f"in {time.monotonic() - began:.2f} s")
    return names


# ---------------------------------------------------------------- backup-fetch: choosing files

KEY_FORMS = ("'database', 'database/table' (schema public), 'database/schema.table' or "
             "'database/schema/table', where '*' matches any characters")

# base/<database>/<file number>[_fork][.segment], and the same under a tablespace's version folder
_RELATION_FILE = re.compile(r"(?:base|pg_tblspc/\d+/[^/]+)/(\d+)/(\d+)(?:_[a-z]+)?(?:\.\d+)?")


def parse_key(key: str) -> tuple[str, str]:
    """WAL-G's key syntax: (database, "schema.table"), the table "" for a whole database."""
    parts = key.split("/")
    if len(parts) == 3:
        parts = [parts[0], f"{parts[1]}.{parts[2]}"]
    if len(parts) == 2:
        table = parts[1].split(".")
        if len(table) == 1:
            return parts[0], "public." + parts[1]
        if len(table) == 2:
            return parts[0], parts[1]
    if len(parts) == 1 and key:
        return key, ""
    raise BackupError(f"--restore-only {key!r} is not a database or table name", hint=f"use {KEY_FORMS}")


def name_pattern(text: str) -> re.Pattern:
    """A whole-name match where `*` is any run of characters and everything else is literal."""
    return re.compile(".*".join(re.escape(piece) for piece in text.split("*")))


def _described(databases_by_names: Any) -> dict[str, tuple[int, dict[str, tuple[int | None, list[int]]]]]:
    """database -> (oid, table -> (oid, [file numbers restored with it])), checked. WAL-G up to
    v3.0.3 wrote "tables" (name -> file number, no OID: None), v3.0.4 "tables" in today's shape."""
    def number(value: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise CorruptObject("files_metadata.json's DatabasesByNames is malformed",
                            detail=f"{value!r} is not an OID", hint="restore the backup whole")

    def table(t: Any) -> tuple[int | None, list[int]]:
        if not isinstance(t, dict):
            return None, [number(t)]
        return number(t.get("oid")), [number(t.get("relfilenode"))] + [
            number(s.get("relfilenode")) for s in (t.get("subtables") or {}).values()]

    return {name: (number(info.get("oid")),
                   {k: table(t) for k, t in (info.get("tables_new") or info.get("tables") or {}).items()})
            for name, info in databases_by_names.items()}


def restore_only_filter(databases_by_names: dict[str, Any] | None, keys: list[str],
                        backup: str) -> Callable[[str], bool]:
    """WAL-G's RegexpRestoreDescMaker and FilterFilesToUnwrap as a predicate on a data-directory
    path: a relation file of a database above SYSTEM_OID_LIMIT is kept only if it is a system
    relation's or a chosen table's (or its subtables'), or its database was chosen whole; every
    other file is kept. An unknown name is an error, raised before anything is restored."""
    if not databases_by_names:
        raise BackupError(f"backup {backup} cannot be restored in part: its files_metadata.json has no "
                          "DatabasesByNames", hint="restore it whole; backup-push records the names (WAL-G too, "
                          "in local mode and without WALG_DISABLE_PARTIAL_RESTORE)")
    if not keys:
        raise BackupError("--restore-only names no database", hint=f"use {KEY_FORMS}")
    try:
        described = _described(databases_by_names)
    except AttributeError:  # a member that is not an object
        raise CorruptObject("files_metadata.json's DatabasesByNames is malformed",
                            hint="restore the backup whole") from None
    # every database's system relations; an OID-less (old) entry is a system one by its file number
    kept: dict[int, set[int]] = {oid: {files[0] for t_oid, files in tables.values()
                                       if (files[0] if t_oid is None else t_oid) < SYSTEM_OID_LIMIT}
                                 for oid, tables in described.values()}
    whole: set[int] = set()
    for key in keys:
        database, table = parse_key(key)
        dbs = [d for name, d in described.items() if name_pattern(database).fullmatch(name)]
        if not dbs:
            raise BackupError(f"--restore-only {key!r}: backup {backup} has no database {database!r}",
                              detail="its databases: " + ", ".join(sorted(described)),
                              hint=f"use {KEY_FORMS}")
        if not table:
            whole.update(oid for oid, _ in dbs)
            continue
        pattern = name_pattern(table)
        chosen = [(oid, files) for oid, tables in dbs for name, (_, files) in tables.items()
                  if pattern.fullmatch(name)]
        if not chosen:
            raise BackupError(f"--restore-only {key!r}: backup {backup} has no table {table!r} in database "
                              f"{database!r}", hint="a table outside schema public needs its schema: "
                                                    "'database/schema.table'")
        for oid, files in chosen:
            kept[oid].update(files)
    log.warning("--restore-only: the other databases' and tables' files are not restored. If WAL after the "
                "backup changed them, recovery may stop with \"WAL contains references to invalid pages\": "
                "recover with ignore_invalid_pages = on. Then drop what was not restored.")

    def keep(relpath: str) -> bool:
        found = _RELATION_FILE.fullmatch(relpath)
        if found is None:
            return True  # not a relation file: global/, PG_VERSION, pg_filenode.map, directories...
        db, filenode = int(found[1]), int(found[2])
        # a database the backup could not describe (no connections allowed) cannot be chosen
        # or cut: it is restored whole, not left without its catalogs
        return db < SYSTEM_OID_LIMIT or db in whole or db not in kept or filenode in kept[db]

    return keep
