"""io_uring file reads (cffi binding of liburing); import UringReader from walrus._uring.reader."""
from walrus._uring.support import DEFAULT_DEPTH, UringUnavailable, open_uring_reader, probe

__all__ = ["DEFAULT_DEPTH", "UringUnavailable", "open_uring_reader", "probe"]
