"""Over 1000 Azure requests through the fault proxy: each operation succeeds whole or fails cleanly, nothing partial."""
from __future__ import annotations

import pytest

from tests.azurite import azure_proxy, azure_settings, azure_storage
from tests.faults.figures import Outcome, Scenario
from tests.faults.proxy_rounds import Round, Target, thousand_requests
from tests.s3server import ACTIONS, FaultProxy
from walrus.storage.base import Storage

pytestmark = pytest.mark.e2e

BLOCK = 64 << 10  # blocks and ranges this small: many requests of few bytes (Azure has no minimum)


class Azure(Target):
    family, scenario, unit = "Azure faults", "Azure proxy, 1000+ requests", BLOCK  # one Put Blob; blocks and a commit
    piece = 16 << 10  # a block gathers several pieces
    noun = "blob"
    exclusive = True  # Put Blob and Put Block List with If-None-Match: *
    # AZURE_TRY_TIMEOUT counts whole minutes: the command line is spared stalls, the library meets them
    # with a one-second timeout (azure_storage's timeout)
    cli_actions = tuple(a for a in ACTIONS if a != "stall")

    def proxy(self, stall_seconds: float) -> FaultProxy:
        return azure_proxy(self.server, stall_seconds=stall_seconds)

    def open(self, endpoint: str, home: str, retries: int) -> Storage:
        return azure_storage(endpoint, self.root, home, timeout=1, attempts=retries + 1,
                             WALG_AZURE_BUFFER_SIZE=str(BLOCK))

    def cli_settings(self, endpoint: str, prefix: str) -> dict[str, str]:
        return azure_settings(endpoint, self.root, prefix, WALG_AZURE_BUFFER_SIZE=str(BLOCK))

    def leftovers(self, s: Scenario, done: Round) -> None:
        """A committed blob holds no uncommitted block (a commit drops them all, so one there is a
        request of ours that landed after its upload's commit); blocks staged on a blob never
        committed are a failed put's."""
        azurite, container = self.server, self.root
        for full in sorted(done.stored):
            if left := azurite.uncommitted_blocks(container, full):
                s.add(Outcome("unclean", f"{left} uncommitted blocks on a committed blob: staged after its commit"),
                      f"{done.phase} {full[len('walrus/'):]}")
        for full in azurite.pending(container, f"walrus/{done.phase}/"):
            # a failed upload's staged blocks: invisible, and out of any request's reach (see
            # tests/azurite.py, azure_backend); a put that succeeded cannot have left any
            if done.put_ok[full[len("walrus/"):]]:
                s.add(Outcome("unclean", "blocks of a successful put left on a blob never committed"), full)
            else:
                s.note("failed uploads whose staged blocks Azure keeps (a week, or until the next commit)")


def test_a_thousand_requests_through_the_fault_proxy(azurite, azure_container, workdir):
    """proxy_rounds' phases on Azurite, every other put exclusive, and no block staged after its commit
    nor left behind by a put that succeeded."""
    thousand_requests(Azure(azurite, azure_container), workdir)
