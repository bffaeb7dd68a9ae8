"""What walrus reads from a pg_control file: whether the cluster's data pages carry checksums."""
from __future__ import annotations

import struct

# ControlFileData holds, in every version walrus supports (10 to 17), this run of uint32 fields:
# blcksz, relseg_size, xlog_blcksz, xlog_seg_size, nameDataLen, indexMaxKeys, toast_max_chunk_size,
# loblksize; then float8ByVal (a bool, padded to 4 bytes) and data_checksum_version (uint32).
_SIZES = struct.Struct("=III")
_CHECKSUM_AFTER_RUN = 9 * 4


def data_checksum_version(control: bytes) -> int | None:
    """pg_control's data_checksum_version (0: no checksums, 1: checksums); None when the file does
    not have the layout (not a pg_control of 8 KiB pages)."""
    at = control.find(_SIZES.pack(8192, 131072, 8192))
    if at < 0 or at + _CHECKSUM_AFTER_RUN + 4 > len(control):
        return None
    (version,) = struct.unpack_from("=I", control, at + _CHECKSUM_AFTER_RUN)
    return version if version in (0, 1) else None
