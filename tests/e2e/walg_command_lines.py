"""Real-world WAL-G command lines: what issue 18 ("a true drop-in") means, as data.

Every entry is a command line that WAL-G's operators run: collected from WAL-G's own documentation
(docs/PostgreSQL.md, docs/README.md, docs/StorageTools.md, docs/STORAGES.md), from WAL-G's
end-to-end test scripts (docker/pg_tests, docker/st_tests, which its users copy), and from the
configurations people publish: Ansible roles, Zalando's Spilo image, Ubicloud, Supabase, GitLab's
runbooks, systemd units, crontabs, Docker images, READMEs and WAL-G's issue tracker. `origin` says
where each one comes from. tests/e2e/test_walg_command_lines.py runs them all, in this order, against walrus installed
as `wal-g`, a real PostgreSQL 15 cluster and file storage, and checks what each one did.

How a line is written

- exactly as published, except that the binary is spelled `wal-g` (published lines say
  /usr/local/bin/wal-g, /usr/bin/wal-g, /opt/wal-g/bin/wal-g, /wal-g) and that paths are
  variables, replaced textually before the line runs:

    $PGDATA            the data directory of the source cluster (also exported, as on a database host)
    $PGHOST            its Unix socket directory
    $WALG_CONFIG       a YAML config file (the /etc/wal-g/wal-g.yaml of the published lines)
    $WALG_CONFIG_JSON  a JSON config file (/etc/wal-g/config.json)
    $WALG_ENV_FILE     a config file in viper's env format, KEY=value lines (/etc/postgresql/wal-g.env)
    $WALG_ENVDIR       a daemontools envdir, one file per setting (/etc/wal-g.d/env, /run/etc/wal-e.d/env)
    $LOG_DIR           where the lines' own redirections write (/var/log/postgresql)
    $RESTORE_DIR       the directory the full restore goes to; recovery runs there
    $FETCH_DIR         a new, empty directory for each line
    $SOCKET            the socket of the daemon serving the source cluster
    $RESTORE_SOCKET    the socket of the daemon serving the restored cluster
    $BACKUP_NAME       the newest backup (what `backup-list | tail -n 1` prints)
    $FIRST_BACKUP      the oldest backup
    $FIRST_NON_PERMANENT_BACKUP  the oldest backup that is not permanent
    $RETAIN_TIME       a UTC time between the second newest backup and the one before it
    $SEGMENT           an archived WAL segment that has later segments archived after it
    $SEGMENT_OBJECT    its key in the storage (wal_005/<segment>.<extension>)
    $LSN               the source cluster's current WAL location
    $TO_CONFIG         the config file of a second, empty storage (for copy)
    $ACCESS_KEY, $SECRET_ACCESS_KEY  the published placeholders <ACCESS_KEY>, <SECRET_ACCESS_KEY>

  PostgreSQL's own placeholders stay: %p and %f in archive_command and restore_command.
  Every config form names the same file storage and the server (PGHOST, PGPORT), each with its
  own compression method, so a stored object's extension shows which config a line used:
  ~/.walg.json and $WALG_CONFIG_JSON lz4, $WALG_CONFIG brotli, $WALG_ENVDIR zstd,
  $WALG_ENV_FILE lzma. Lines run as the database's OS user, in a work directory holding
  `testfile` (1 MiB), with HOME holding ~/.walg.json.

- kind says how the line runs:
    archive_command  set with ALTER SYSTEM on the source cluster; PostgreSQL's archiver runs it
    restore_command  set on the restored cluster (a standby replaying the archive, then an archive
                     recovery to its end); PostgreSQL's startup process runs it
    cron             a crontab line (schedule fields, and the user field of /etc/cron.d, are
                     dropped; `\\%` becomes `%`, as cron does) or a command a cron job runs
    systemd          an Exec*= line of a unit (the key is dropped); `wal-g daemon` runs as a service
    manual           what an operator types, or a script runs
- outcome is OK (the line does what WAL-G does; `what` says what is checked) or NOT_IMPLEMENTED
  (a feature walrus documents as not implemented yet, docs/WALG_COMPAT.md: exit 1, ERROR and HINT
  on stderr naming `what`, nothing written to the storage or to $FETCH_DIR).
- env: extra environment for that line only (a value None unsets the variable); args: the
  positional parameters of a script line ($1, $2...).

Adding a line: append an entry where its state makes sense (the list is one scenario: archiving,
backups, listing, restores, storage tools, then retention, `delete everything FORCE` last), write
its check in test_walg_command_lines.py under the same id (an OK line without a check fails the
suite), and run `.venv/bin/python -m pytest -q tests/e2e/test_walg_command_lines.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

OK = "ok"
NOT_IMPLEMENTED = "not implemented"

ARCHIVE = "archive_command"
RESTORE = "restore_command"
CRON = "cron"
SYSTEMD = "systemd"
MANUAL = "manual"

WALG = "https://github.com/wal-g/wal-g/blob/master/"
PG_TESTS = WALG + "docker/pg_tests/scripts/tests/"
ST_TESTS = WALG + "docker/st_tests/scripts/tests/storage_tool_tests.sh"
ENVY16 = "https://github.com/envy16/ansible-role-wal_g/blob/master/"
BOT_DELO = "https://github.com/Studio-Yandex-Practicum/bot_delo_zhivet/blob/master/README.md"
UBICLOUD = "https://github.com/ubicloud/ubicloud/blob/main/"
GITLAB_RUNBOOK = "https://gitlab.com/gitlab-com/runbooks/-/blob/master/docs/patroni/geo-patroni-cluster.md"
PLAYGROUND = "https://github.com/stephane-klein/playground-postgresql-walg/blob/master/"
SPILO = "https://github.com/zalando/spilo/blob/master/postgres-appliance/scripts/"
USER_DATA = '"{ \\"x\\": [3], \\"y\\": 4 }"'  # WAL-G's docs' user data, quoted as its docs write it


@dataclass(frozen=True)
class Line:
    id: str
    line: str
    origin: str
    kind: str
    outcome: str
    what: str
    env: tuple[tuple[str, str | None], ...] = ()
    args: tuple[str, ...] = ()


LINES: tuple[Line, ...] = (
    # ---------------------------------------------------------------- archive_command
    Line("archive-plain", "wal-g wal-push %p",
         "https://github.com/wal-g/wal-g/issues/1287", ARCHIVE, OK,
         "the archiver archives the switched segment (archived_count grows, failed_count does not); "
         "it is stored as wal_005/<segment>.lz4, the method of ~/.walg.json"),
    Line("archive-env-keys-log",
         'env AWS_ACCESS_KEY_ID=$ACCESS_KEY AWS_SECRET_ACCESS_KEY=$SECRET_ACCESS_KEY wal-g wal-push "%p" '
         '>> $LOG_DIR/archive_command.log 2>&1',
         BOT_DELO, ARCHIVE, OK,
         "archived, stored .lz4; S3 keys beside a file storage change nothing; the log file is written"),
    Line("archive-timeout-config", "/usr/bin/timeout 600 wal-g --config=$WALG_CONFIG wal-push %p",
         PG_TESTS + "delete_garbage_multist_test.sh", ARCHIVE, OK,
         "archived and stored .br: --config= before the command is read"),
    Line("archive-envfile-config-after", "wal-g wal-push %p --config $WALG_ENV_FILE",
         UBICLOUD + "model/postgres/postgres_server.rb (archive_command of servers with use_old_walg_command)",
         ARCHIVE, OK,
         "archived and stored .lzma: a viper env-format config file (KEY=value lines), given after the "
         "command, is read"),
    Line("archive-envdir-spilo", 'envdir "$WALG_ENVDIR" wal-g wal-push "%p"',
         SPILO + "configure_spilo.py (archive_command of Zalando's Spilo image)", ARCHIVE, OK,
         "archived and stored .zst: settings from the environment alone (an envdir)"),
    Line("archive-setting-flags", "wal-g wal-push %p --walg-upload-concurrency 4 --total-bg-uploaded-limit 1024",
         WALG + "docs/PostgreSQL.md (TOTAL_BG_UPLOADED_LIMIT, e.g. 1024; WALG_UPLOAD_CONCURRENCY) as WAL-G's "
         "per-setting flags (internal/config.go)", ARCHIVE, OK,
         "three segments switched at once are all archived and stored, none failed"),
    Line("archive-ready-rename", "/usr/bin/timeout 600 wal-g --config=$WALG_CONFIG wal-push %p --pg-ready-rename=true",
         PG_TESTS + "archiving_ready_rename.sh", ARCHIVE, OK,
         "archived and stored .br; no .ready file is left in archive_status"),
    Line("daemon-service", "ExecStart=wal-g daemon $SOCKET",
         UBICLOUD + "rhizome/postgres/lib/postgres_setup.rb (wal-g.service)", SYSTEMD, OK,
         "the daemon creates $SOCKET and keeps running"),
    Line("archive-daemon-client", "walg-daemon-client $SOCKET wal-push %f",
         WALG + "docs/PostgreSQL.md (walg-daemon-client); " + UBICLOUD + "model/postgres/postgres_server.rb",
         ARCHIVE, OK, "archived through the daemon and stored .lz4"),
    Line("archive-ansible-role", 'wal-g --config $WALG_CONFIG wal-push "%p" >> $LOG_DIR/wal-g-archive.log 2>&1',
         ENVY16 + "defaults/main.yml (wal_g_archive_command)", ARCHIVE, OK,
         "archived and stored .br; the log file is written (this command stays for the rest of the run)"),

    # ---------------------------------------------------------------- backup-push
    Line("backup-push-docs", "wal-g backup-push $PGDATA",
         WALG + "docs/PostgreSQL.md (backup-push)", MANUAL, OK,
         "one new backup is listed, with its sentinel, metadata.json (PostgreSQL 15) and .lz4 parts"),
    Line("backup-push-cron-su",
         "0 3 * * * su - postgres -c 'wal-g backup-push $PGDATA' >> $LOG_DIR/walg_backup.log 2>&1",
         BOT_DELO, CRON, OK,
         "one new backup, from a login shell whose only settings are ~/.walg.json (PGHOST, PGPORT there)"),
    Line("backup-push-systemd", "ExecStart=wal-g --config $WALG_CONFIG backup-push $PGDATA",
         ENVY16 + "templates/wal-g-backup.service.j2 with defaults/main.yml (wal_g_backup_command)", SYSTEMD, OK,
         "one new backup whose parts are .br (the unit's --config)"),
    Line("backup-push-permanent", "wal-g --config=$WALG_CONFIG backup-push --permanent $PGDATA",
         PG_TESTS + "delete_before_permanent_delta_test.sh", MANUAL, OK,
         "one new backup, permanent in its metadata.json"),
    Line("backup-push-f-playground", "wal-g backup-push -f $PGDATA",
         PLAYGROUND + "scripts/make-basebackup.sh (the playground WAL-G's docs link to)", MANUAL, OK,
         "one new backup (-f: full)"),
    Line("backup-push-full-after", "wal-g --config=$WALG_CONFIG backup-push $PGDATA --full",
         PG_TESTS + "delete_target_delta_test.sh (and `-f` in delta_backup_fullscan_test.sh)", MANUAL, OK,
         "one new backup (--full after the directory)"),
    Line("backup-push-add-user-data", "wal-g backup-push $PGDATA --add-user-data " + USER_DATA,
         WALG + "docs/PostgreSQL.md (the user data of --target-user-data; cmd/pg/backup_push.go --add-user-data)",
         MANUAL, OK, "one new backup whose sentinel's UserData is {\"x\": [3], \"y\": 4}"),
    Line("backup-push-sentinel-env",
         'WALG_SENTINEL_USER_DATA="{ \\"backup_id\\": $1, \\"project_id\\": $2 }" wal-g backup-push $PGDATA',
         "https://github.com/supabase/postgres/pull/145 (commence_walg_backup.sh, without its --verify)",
         MANUAL, OK, "one new backup whose sentinel's UserData is {\"backup_id\": 42, \"project_id\": 7}",
         args=("42", "7")),
    Line("backup-push-rating-composer", "wal-g backup-push $PGDATA --rating-composer",
         WALG + "docs/PostgreSQL.md (rating composer mode)", MANUAL, OK,
         "one new backup (the composer flag is accepted)"),
    Line("backup-push-pghost", "wal-g backup-push --pghost $PGHOST",
         WALG + "docs/PostgreSQL.md (remote backup: `wal-g backup-push --pghost srv1`)", MANUAL, OK,
         "one new backup of the server at --pghost, its data directory from PGDATA (WAL-G streams the "
         "same backup over BASE_BACKUP)"),
    Line("backup-push-turbo", "wal-g backup-push $PGDATA --turbo",
         WALG + "cmd/pg/pg.go (--turbo: ignore all kinds of throttling defined in config)", MANUAL, OK,
         "one new backup, rate limits of the config lifted"),

    # ---------------------------------------------------------------- backup-list
    Line("list-envdir-gitlab", "envdir $WALG_ENVDIR wal-g backup-list",
         GITLAB_RUNBOOK, MANUAL, OK, "a header, then every backup in the storage, oldest first, name first"),
    Line("list-detail", "wal-g --config=$WALG_CONFIG backup-list --detail",
         PG_TESTS + "delete_before_permanent_delta_test.sh", MANUAL, OK, "every backup is listed"),
    Line("list-pretty", "wal-g backup-list --pretty", WALG + "docs/README.md (backup-list --pretty)", MANUAL, OK,
         "a boxed table naming every backup"),
    Line("list-json", "wal-g backup-list --json", WALG + "docs/README.md (backup-list --json)", MANUAL, OK,
         "a JSON array with one object per backup, backup_name as in the storage"),
    Line("list-pretty-detail-json", "wal-g backup-list --pretty --detail --json",
         WALG + "docs/PostgreSQL.md (backup-mark: names 'retrievable via wal-g backup-list --pretty --detail --json')",
         MANUAL, OK, "indented JSON of every backup; is_permanent true exactly for the permanent one"),
    Line("list-tail-cut", 'wal-g --config=$WALG_CONFIG backup-list | tail -n 1 | cut -f 1 -d " "',
         PG_TESTS + "backup_mark_permanent_test.sh", MANUAL, OK, "prints the newest backup's name"),
    Line("list-spilo-parse",
         "wal-g backup-list 2> /dev/null | sed '0,/^\\(backup_\\)\\?name\\s*\\(last_\\)\\?modified\\s*/d'",
         SPILO + "postgres_backup.sh (parsed with `read -r name last_modified rest; date -ud $last_modified`)",
         CRON, OK, "one line per backup, oldest first: its name, then a time `date -ud` reads"),

    # ---------------------------------------------------------------- backup-mark
    Line("mark-permanent", 'wal-g --config=$WALG_CONFIG backup-mark "$BACKUP_NAME"',
         PG_TESTS + "backup_mark_permanent_test.sh", MANUAL, OK, "the newest backup becomes permanent"),
    Line("mark-impermanent", "wal-g backup-mark $BACKUP_NAME -i",
         WALG + "docs/PostgreSQL.md (`wal-g backup-mark example-backup -i`)", MANUAL, OK,
         "the newest backup is impermanent again"),

    # ---------------------------------------------------------------- restore: backup-fetch, then recovery
    Line("fetch-playground", "wal-g backup-fetch $RESTORE_DIR LATEST; touch $RESTORE_DIR/recovery.signal",
         PLAYGROUND + "scripts/pg2/restore.sh", MANUAL, OK,
         "the newest backup is restored (backup_label's start is its start_lsn, pg_control present)"),
    Line("daemon-restore", "wal-g --config=$WALG_CONFIG daemon $RESTORE_SOCKET &",
         PG_TESTS + "daemon_test.sh", MANUAL, OK,
         "the daemon of the restored cluster creates $RESTORE_SOCKET and keeps running",
         env=(("PGDATA", "$RESTORE_DIR"),)),
    Line("restore-plain", "wal-g wal-fetch %f %p",
         "https://github.com/wal-g/wal-g/issues/1287", RESTORE, OK,
         "the restored cluster, a standby replaying the archive, reaches consistency and replays a "
         "segment archived after this restore_command was set"),
    Line("restore-config-after", 'wal-g wal-fetch "%f" "%p" --config $WALG_CONFIG',
         "https://github.com/wal-g/wal-g/issues/1287 (x4m: `wal-g wal-fetch \"%f\" \"%p\" --config "
         "/etc/wal-g/wal-g.yaml`)", RESTORE, OK, "the standby replays a newly archived segment"),
    Line("restore-echo", 'echo "WAL file restoration: %f, %p"&& wal-g --config=$WALG_CONFIG wal-fetch "%f" "%p"',
         PG_TESTS + "delete_before_permanent_delta_test.sh", RESTORE, OK,
         "the standby replays a newly archived segment"),
    Line("restore-envdir", 'envdir $WALG_ENVDIR wal-g wal-fetch "%f" "%p"',
         GITLAB_RUNBOOK + " (recovery.conf)", RESTORE, OK,
         "the standby replays a newly archived segment (settings from the envdir alone)"),
    Line("restore-daemon-client", "walg-daemon-client $RESTORE_SOCKET wal-fetch %f %p",
         WALG + "docs/PostgreSQL.md (walg-daemon-client); " + PG_TESTS + "test_functions/daemon_client_patch.sh",
         RESTORE, OK, "the standby replays a newly archived segment through the daemon"),
    Line("restore-ansible-role", 'wal-g --config $WALG_CONFIG wal-fetch "%f" "%p" >> $LOG_DIR/wal-g-restore.log 2>&1',
         ENVY16 + "defaults/main.yml (wal_g_restore_command)", RESTORE, OK,
         "archive recovery (recovery.signal) to the end of the archive: the cluster promotes and its "
         "tables hold exactly the source's (Cluster.digest)"),

    # ---------------------------------------------------------------- more backup-fetch (files only)
    Line("fetch-config-between", "wal-g backup-fetch --config=$WALG_CONFIG $FETCH_DIR $FIRST_BACKUP",
         PG_TESTS + "delete_before_permanent_delta_test.sh", MANUAL, OK,
         "the oldest backup is restored (backup_label's start is its start_lsn)"),
    Line("fetch-target-user-data", "wal-g backup-fetch $FETCH_DIR --target-user-data " + USER_DATA,
         WALG + "docs/PostgreSQL.md (backup-fetch --target-user-data)", MANUAL, OK,
         "the backup pushed with that user data is restored"),
    Line("fetch-reverse-skip", "wal-g backup-fetch $FETCH_DIR LATEST --reverse-unpack --skip-redundant-tars",
         WALG + "docs/PostgreSQL.md (redundant archives skipping)", MANUAL, OK,
         "the newest backup is restored: every file of its files_metadata.json is there"),
    Line("fetch-restore-only",
         'wal-g backup-fetch $FETCH_DIR LATEST --restore-only=my_database,"another database",database/my_table',
         WALG + "docs/PostgreSQL.md (partial restore)", MANUAL, OK,
         "files of my_database, \"another database\" and database.my_table are restored; those of "
         "other_db and database.other_table are not"),
    Line("fetch-mask", 'wal-g backup-fetch $FETCH_DIR LATEST --mask "base/1/*"',
         WALG + "cmd/pg/backup_fetch.go (--mask: only files whose path matches the shell pattern)", MANUAL, OK,
         "the files of base/1 are restored, no other relation file"),

    # ---------------------------------------------------------------- wal-fetch, wal-prefetch
    Line("wal-fetch-manual", 'wal-g --config=$WALG_CONFIG wal-fetch "$SEGMENT" "$FETCH_DIR/$SEGMENT"',
         PG_TESTS + "prefetch_test.sh", MANUAL, OK,
         "the 16 MiB segment is written, its first page names that segment"),
    Line("wal-fetch-missing", "wal-g wal-fetch 00000001000000030000009A $FETCH_DIR/00000001000000030000009A",
         "https://github.com/wal-g/wal-g/pull/1195", MANUAL, OK,
         "exit 74 (not in the archive), nothing written"),
    Line("wal-prefetch", "wal-g wal-prefetch $SEGMENT $FETCH_DIR --config $WALG_CONFIG",
         WALG + "internal/databases/postgres/wal_prefetcher.go (the command wal-fetch starts)", MANUAL, OK,
         "the segment after $SEGMENT is downloaded whole into $FETCH_DIR/.wal-g/prefetch/"),

    # ---------------------------------------------------------------- storage tools, copy
    Line("st-ls", "wal-g st ls", WALG + "docs/StorageTools.md", MANUAL, OK,
         "lists the folders basebackups_005/ and wal_005/"),
    Line("st-ls-r", "wal-g --config=$WALG_CONFIG st ls -r",
         PG_TESTS + "test_functions/remote_backup_and_restore_test.sh", MANUAL, OK,
         "lists every sentinel and archived segment, recursively"),
    Line("st-cat-redirect",
         'wal-g st cat "basebackups_005/${BACKUP_NAME}_backup_stop_sentinel.json" > '
         '"$FETCH_DIR/${BACKUP_NAME}_backup_stop_sentinel.json" --config=$WALG_CONFIG',
         PG_TESTS + "delete_garbage_multist_test.sh", MANUAL, OK, "the sentinel's bytes, unchanged"),
    Line("st-get", "wal-g st get $SEGMENT_OBJECT $FETCH_DIR/$SEGMENT",
         WALG + "docs/StorageTools.md (`wal-g st get path/to/remote_file path/to/local_file`)", MANUAL, OK,
         "the segment, decompressed"),
    Line("st-put", "wal-g st put testfile testfolder/testfile", ST_TESTS, MANUAL, OK,
         "stored as testfolder/testfile.br (brotli, the test's environment)",
         env=(("WALG_COMPRESSION_METHOD", "brotli"),)),
    Line("st-put-duplicate", "wal-g st put testfile testfolder/testfile", ST_TESTS, MANUAL, OK,
         "refused without -f (non-zero exit); the stored object is unchanged",
         env=(("WALG_COMPRESSION_METHOD", "brotli"),)),
    Line("st-get-testfile", "wal-g st get testfolder/testfile.br fetched_testfile", ST_TESTS, MANUAL, OK,
         "fetched_testfile equals testfile", env=(("WALG_COMPRESSION_METHOD", "brotli"),)),
    Line("st-rm", "wal-g st rm testfolder/testfile.br", ST_TESTS, MANUAL, OK, "the object is gone",
         env=(("WALG_COMPRESSION_METHOD", "brotli"),)),
    Line("st-check-read", "wal-g st check read",
         WALG + "cmd/common/st/check.go; the storage probe of wal-g exporters", MANUAL, OK, "exit 0"),
    Line("st-check-write", "wal-g st check write", WALG + "cmd/common/st/check.go", MANUAL, OK,
         "exit 0, and nothing is left in the storage"),
    Line("copy-docs", "wal-g copy --from=$WALG_CONFIG --to=$TO_CONFIG",
         WALG + "docs/PostgreSQL.md (copy: `wal-g copy --from=config_from.json --to=config_to.json`)", MANUAL, OK,
         "the second storage lists the same backups, each with the WAL from its start to its finish"),
    Line("st-ls-all-versions", "wal-g st ls --all-versions", WALG + "docs/StorageTools.md", MANUAL,
         NOT_IMPLEMENTED, "--all-versions"),
    Line("st-transfer", "wal-g --config=$WALG_CONFIG st transfer pg-wals --source=failover --target=default "
         "--overwrite --fail-fast", PG_TESTS + "transfer_backup_test.sh", MANUAL, NOT_IMPLEMENTED, "transfer"),

    # ---------------------------------------------------------------- what walrus does not have yet
    Line("wal-verify", "wal-g wal-verify integrity timeline", WALG + "docs/PostgreSQL.md (wal-verify)",
         MANUAL, OK, "both checks OK: every segment from the oldest backup to the primary's, on its timeline"),
    Line("wal-show", "wal-g wal-show", WALG + "docs/PostgreSQL.md (wal-show)", MANUAL, OK,
         "timeline 1's range, OK, with its backups counted"),
    Line("backup-push-verify-supabase",
         'WALG_SENTINEL_USER_DATA="{ \\"project_id\\": $1, \\"backup_id\\": $2 }" nohup wal-g backup-push $PGDATA '
         "--config $WALG_CONFIG_JSON --verify >> $LOG_DIR/backup-push.log 2>&1 &",
         "https://github.com/supabase/postgres (ansible/files/admin_api_scripts/commence_walg_backup.sh)",
         MANUAL, OK, "one new backup with that user data, its pages checked (none corrupt)", args=("7", "42")),
    Line("backup-push-delta-from-name",
         "wal-g backup-push $PGDATA --delta-from-name base_000000010000000100000072_D_000000010000000100000063",
         WALG + "docs/PostgreSQL.md (delta backup from a specific backup)", MANUAL, OK,
         "one new full backup: WALG_DELTA_MAX_STEPS is 0, so WAL-G too takes a full one without looking the "
         "name up"),
    Line("backup-push-remote", "PGHOST=$PGHOST wal-g backup-push",
         WALG + "docs/PostgreSQL.md (remote backup: `PGHOST=srv1 wal-g backup-push`, on a host without PGDATA)",
         MANUAL, OK, "one new full backup streamed over a replication connection (BASE_BACKUP): WAL-G's remote "
         "layout, pg_control.tar and no backup_label.tar", env=(("PGDATA", None),)),
    Line("catchup-push", "wal-g --config=$WALG_CONFIG catchup-push $PGDATA --from-lsn $LSN",
         PG_TESTS + "catchup_test.sh", MANUAL, NOT_IMPLEMENTED, "catchup-push"),
    Line("pgbackrest-fetch", "wal-g --config=$WALG_CONFIG pgbackrest backup-fetch $FETCH_DIR LATEST",
         PG_TESTS + "pgbackrest_backup_fetch_test.sh", MANUAL, NOT_IMPLEMENTED, "pgbackrest"),

    # ---------------------------------------------------------------- retention (delete everything FORCE last)
    Line("delete-target-user-data-dry", "wal-g delete target --target-user-data " + USER_DATA,
         WALG + "docs/README.md (delete target --target-user-data)", MANUAL, OK,
         "a dry run: nothing is deleted; the plan names the backup with that user data"),
    Line("delete-garbage-archives-dry", "wal-g delete garbage ARCHIVES --config=$WALG_CONFIG",
         PG_TESTS + "delete_garbage_multist_test.sh; docs/PostgreSQL.md (delete garbage)", MANUAL, OK,
         "a dry run: nothing is deleted"),
    Line("delete-before-30-days-cron",
         '0 3 * * * su - postgres -c \'wal-g delete before FIND_FULL $(date -d "-30 days" "+\\%FT\\%TZ") '
         "--confirm' >> $LOG_DIR/walg_delete.log 2>&1",
         BOT_DELO, CRON, OK,
         "no backup is 30 days old: every backup stays; the target is the oldest backup, so (as in WAL-G) "
         "only WAL older than it goes"),
    Line("delete-retain-10-weekly", "@weekly wal-g delete retain 10 --confirm",
         "https://github.com/zyun-i/postgres-wal-g/blob/master/README.md (cron)", CRON, OK,
         "the 10 newest backups and the permanent one stay, the others go with the WAL older than "
         "every backup kept; each kept backup keeps its WAL"),
    Line("delete-retain-full-7-unit", "ExecStartPost=wal-g --config $WALG_CONFIG delete retain FULL 7 --confirm",
         ENVY16 + "templates/wal-g-backup.service.j2 (wal_g_retention_command)", SYSTEMD, OK,
         "the 7 newest backups and the permanent one stay"),
    Line("delete-retain-Full-5-envdir", "envdir $WALG_ENVDIR wal-g delete retain Full 5 --confirm",
         "a shell note published on GitHub ('# Wal-g ... # Delete the older than 5 days backup'; the search "
         "index did not name its repository). WAL-G reads any first word other than FULL as FIND_FULL: "
         "internal/delete_handler.go ExtractDeleteModifierFromArgs", MANUAL, OK,
         "as WAL-G's `retain FIND_FULL 5`: the 5 newest backups and the permanent one stay"),
    Line("delete-retain-full-5-sentinel-time", "wal-g delete retain FULL 5 --use-sentinel-time --confirm",
         WALG + "docs/PostgreSQL.md (delete retention ordering)", MANUAL, OK,
         "the 5 newest backups and the permanent one stay (nothing else is left to delete)"),
    Line("delete-retain-after", 'wal-g --config=$WALG_CONFIG delete retain 1 --after "$RETAIN_TIME" --confirm',
         PG_TESTS + "delete_retain_after_test.sh", MANUAL, OK,
         "the newest backup, those after $RETAIN_TIME and the permanent one stay; older ones go"),
    Line("delete-target-first-non-permanent",
         'wal-g --config=$WALG_CONFIG delete target "$FIRST_NON_PERMANENT_BACKUP" --confirm',
         PG_TESTS + "delete_garbage_multist_test.sh", MANUAL, OK,
         "that backup alone is deleted, and no WAL"),
    Line("delete-garbage-confirm", "wal-g --config=$WALG_CONFIG delete garbage --confirm",
         PG_TESTS + "delete_garbage_multist_test.sh", MANUAL, OK,
         "every backup stays, with its WAL; no WAL older than the oldest backup is left"),
    Line("delete-everything-permanent", "wal-g --config=$WALG_CONFIG delete everything --confirm",
         PG_TESTS + "delete_before_permanent_delta_test.sh", MANUAL, OK,
         "refused while a permanent backup exists (non-zero exit); nothing is deleted"),
    Line("delete-everything-force", "wal-g --config=$WALG_CONFIG delete everything FORCE --confirm",
         PG_TESTS + "daemon_test.sh (and most of WAL-G's tests)", MANUAL, OK,
         "every backup, the permanent one too, and all WAL are gone; backup-list --json prints []"),
)
