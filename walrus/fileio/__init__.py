"""Local file I/O, the one face engines use: the buffer pool, batched reads, restore sinks, the open
policy for direct I/O, and the one choice between io_uring (walrus._uring, beneath) and plain I/O."""
from walrus.fileio.buffers import Buffer, BufferPool
from walrus.fileio.choose import open_reader, open_sink
from walrus.fileio.direct import DIO_ALIGN, dio_length, open_for_backup
from walrus.fileio.reader import FileReader, PreadReader, ReadRequest, file_buffers
from walrus.fileio.sink import FileSink, PlainSink

__all__ = ["DIO_ALIGN", "Buffer", "BufferPool", "FileReader", "FileSink", "PlainSink", "PreadReader", "ReadRequest",
           "dio_length", "file_buffers", "open_for_backup", "open_reader", "open_sink"]
