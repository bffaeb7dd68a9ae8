"""Over 1000 GCS requests through the fault proxy: each operation succeeds whole or fails cleanly, nothing partial."""
from __future__ import annotations

import pytest

from tests.faults.figures import Scenario
from tests.faults.proxy_rounds import Round, Target, thousand_requests
from tests.gcsserver import CHUNK, gcs_proxy, gcs_settings, gcs_storage
from tests.s3server import ACTIONS, FaultProxy
from walrus.storage.base import Storage

pytestmark = pytest.mark.e2e

WATCHDOG = 0.5  # the library rounds' no-progress limit per request: a stall costs half a second


class Gcs(Target):
    family, scenario, unit = "GCS faults", "GCS proxy, 1000+ requests", CHUNK  # one multipart upload; resumable

    def proxy(self, stall_seconds: float) -> FaultProxy:
        return gcs_proxy(self.server, stall_seconds=stall_seconds)

    def open(self, endpoint: str, home: str, retries: int) -> Storage:
        return gcs_storage(endpoint, self.root, home, timeout=WATCHDOG, GCS_MAX_RETRIES=str(retries))

    def cli_settings(self, endpoint: str, prefix: str) -> dict[str, str]:
        return gcs_settings(endpoint, self.root, prefix, GCS_MAX_RETRIES="6", GCS_CONTEXT_TIMEOUT="30")

    def leftovers(self, s: Scenario, done: Round) -> None:
        # A session neither finalized nor cancelled holds no object and expires by itself; one is left by
        # a lost answer to a session's start, or a cancellation whose few tries all met faults.
        left = [k for k in self.server.pending_uploads(self.root) if k.startswith(f"walrus/{done.phase}/")]
        if left:
            s.note("resumable sessions left open (no object; they expire)", len(left))

    def notes(self, s: Scenario, proxy: FaultProxy) -> None:
        s.note("resumable chunk requests", proxy.count("part"), add=False)


def test_a_thousand_requests_through_the_fault_proxy(gcs_server, gcs_bucket, workdir):
    """proxy_rounds' phases on fake-gcs-server, behind its front; and every kind of fault took effect."""
    proxy = thousand_requests(Gcs(gcs_server, gcs_bucket), workdir)
    assert {a for a, _ in proxy.applied} == set(ACTIONS)
