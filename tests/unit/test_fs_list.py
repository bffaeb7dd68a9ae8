"""File storage listings cancelled mid-batch (SIGTERM, a failed sibling task) release their
directory safely: the batch still reading it on a worker thread closes it, never the loop under it."""
from __future__ import annotations

import asyncio
import os

from walrus.storage.fs import FsStorage


def test_cancelled_listings_never_close_a_directory_under_its_reader(tmp_path):
    folder = tmp_path / "wal_005"
    folder.mkdir()
    for i in range(20_000):  # batches of 1,000 entries: each takes the worker thread a while
        (folder / f"{i:024X}").touch()
    storage = FsStorage(str(tmp_path))

    async def cancel_mid_batch() -> None:
        async def consume() -> None:
            async for _ in storage.list("wal_005"):
                await asyncio.sleep(0)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.002)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    async def main() -> None:
        for _ in range(150):  # closing under the reader crashed the interpreter within a few dozen
            await cancel_mid_batch()

    before = len(os.listdir(f"/proc/{os.getpid()}/fd"))
    asyncio.run(main())  # which waits for the worker threads, so the last batches have ended
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) == before  # every directory closed
    assert sum(1 for _ in folder.iterdir()) == 20_000
