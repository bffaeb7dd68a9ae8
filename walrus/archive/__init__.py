"""Commands over the whole archive, backups and WAL together: wal-show, wal-verify."""
