"""WAL-G's Unix-socket daemon: archive_command and restore_command served by one long-lived process."""
