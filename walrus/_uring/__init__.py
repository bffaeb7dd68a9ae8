"""io_uring file reads and writes (cffi binding of liburing): UringReader in .reader, the write ring of walrus.fileio's sink in .writer."""
from walrus._uring.support import DEFAULT_DEPTH, UringUnavailable, open_uring_reader, probe

__all__ = ["DEFAULT_DEPTH", "UringUnavailable", "open_uring_reader", "probe"]
