"""walrus: a WAL-G-compatible PostgreSQL backup tool."""

__version__ = "0.1.0"
