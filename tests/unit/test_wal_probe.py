"""wal-fetch's probe order: configured extension first, then WAL-G's order, then the bare name."""
from walrus.wal.stored import candidate_keys

SEG = "000000010000000000000003"


def test_probe_order_for_default_lz4():
    assert [k for k, _ in candidate_keys(SEG, "lz4")] == [
        f"wal_005/{SEG}.lz4", f"wal_005/{SEG}.lzma", f"wal_005/{SEG}.gz", f"wal_005/{SEG}.",
        f"wal_005/{SEG}.br", f"wal_005/{SEG}.lzo", f"wal_005/{SEG}.zst", f"wal_005/{SEG}"]


def test_configured_method_goes_first_once():
    keys = candidate_keys(SEG, "zstd")
    assert keys[0] == (f"wal_005/{SEG}.zst", "zst")
    assert [k for k, _ in keys].count(f"wal_005/{SEG}.zst") == 1
    assert keys[-1] == (f"wal_005/{SEG}", "")


def test_none_probes_trailing_dot_then_bare():
    keys = candidate_keys(SEG, "none")
    assert keys[0] == (f"wal_005/{SEG}.", "")
    assert keys[-1] == (f"wal_005/{SEG}", "")
    assert dict(keys)[f"wal_005/{SEG}.gz"] == "gz"
