"""Over 1000 S3 requests through the fault proxy: each operation succeeds whole or fails cleanly, nothing partial."""
from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest

from tests.faults.figures import Outcome, Scenario
from tests.faults.proxy_rounds import Round, Target, thousand_requests
from tests.s3server import MIN_PART_SIZE, FaultProxy, s3_settings, s3_storage
from walrus.storage.base import Storage

pytestmark = pytest.mark.e2e

PART = MIN_PART_SIZE  # parts and ranges at moto's floor: many requests of few bytes


def open_s3(endpoint: str, bucket: str, home: str, **extra: str) -> Storage:
    return s3_storage(endpoint, bucket, home, WALG_S3_MAX_PART_SIZE=str(PART), WALRUS_S3_RANGE_SIZE=str(PART),
                      AWS_EC2_METADATA_DISABLED="true", **extra)


class S3(Target):
    family, scenario, unit = "S3 faults", "proxy, 1000+ requests", PART  # one PutObject; 3 and 5 parts

    def proxy(self, stall_seconds: float) -> FaultProxy:
        return FaultProxy(self.server.port, stall_seconds=stall_seconds)

    def open(self, endpoint: str, home: str, retries: int) -> Storage:
        return open_s3(endpoint, self.root, home, WALRUS_S3_TIMEOUT="1", WALG_S3_MAX_RETRIES=str(retries))

    def cli_settings(self, endpoint: str, prefix: str) -> dict[str, str]:
        return s3_settings(endpoint, self.root, prefix, WALRUS_S3_TIMEOUT="1", WALG_S3_MAX_RETRIES="6")

    def leftovers(self, s: Scenario, done: Round) -> None:
        """No multipart upload may stay pending but where walrus said it gave up its clean-up, and
        those `delete garbage` must remove.

        The clean-up of a failed upload, or of a create whose answer was lost, is best effort: a few
        tries (ABORT_ATTEMPTS), then a warning, whatever WALG_S3_MAX_RETRIES says; `delete garbage`
        removes what it leaves. Those warnings say which uploads may stay pending."""
        phase, bucket, moto = done.phase, self.root, self.server
        gave_up = [m for m in done.warnings if m.startswith("could not abort")]
        pending = sorted(set(k for k in moto.pending_uploads(bucket) if k.startswith(f"walrus/{phase}/")))
        for key in pending:
            if "/doomed-" in key:
                # every request for this key fails, the abort too: nothing could remove the upload
                s.note("pending uploads of keys whose every request fails")
            elif done.doomed or any(f" {key[len('walrus/'):]}:" in m for m in gave_up):
                # retries too few on purpose (one), or the clean-up's own few tries all met a fault: the
                # upload is invisible garbage, which `delete garbage` must then remove (below)
                s.note("uploads left pending where the clean-up's retries ran out, then removed by delete garbage")
            else:
                how = "succeeded" if done.put_ok[key[len("walrus/"):]] else "failed"
                s.add(Outcome("unclean", f"a multipart upload is left pending (the put {how}; its abort or the "
                                         "clean-up of a lost create gave up, with retries enough)"), f"{phase} {key}")
        if any("/doomed-" not in key for key in pending):
            async def reclaim() -> None:  # delete garbage's capabilities, straight to S3 (no faults now)
                storage = open_s3(moto.endpoint, bucket, done.home)
                try:
                    # moto dates every upload 2010-11-10, so any cut-off takes them all
                    found = await storage.abandoned_uploads(phase, datetime.now(timezone.utc))
                    await storage.discard_uploads([u for u in found if "/doomed-" not in u.key])
                finally:
                    await storage.close()

            asyncio.run(reclaim())
            for key in moto.pending_uploads(bucket):
                if key.startswith(f"walrus/{phase}/") and "/doomed-" not in key:
                    s.add(Outcome("unclean", "delete garbage did not remove an abandoned multipart upload"),
                          f"{phase} {key}")


def test_a_thousand_requests_through_the_fault_proxy(moto_server, s3_bucket, workdir):
    """proxy_rounds' phases on moto, and no multipart upload left pending that walrus did not say it
    gave up on, nor one that `delete garbage` then leaves."""
    thousand_requests(S3(moto_server, s3_bucket), workdir)
