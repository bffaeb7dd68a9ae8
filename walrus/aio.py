"""Async helpers every layer may use: run coroutines together, failing as one."""
from __future__ import annotations

import asyncio


async def gather_all(coros) -> list:
    """Run all concurrently; on the first failure cancel the others, wait for them, re-raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
