"""S3's timestamps: the ISO 8601 times of a listing by Python's parser, anything else by botocore's."""
from datetime import datetime, timedelta, timezone

import pytest

from walrus.storage.s3 import _parse_timestamp


@pytest.mark.parametrize("text, expected", [
    ("2026-12-04T20:50:37.123Z", datetime(2026, 12, 4, 20, 50, 37, 123000, timezone.utc)),  # S3, moto
    ("2026-12-04T20:50:37Z", datetime(2026, 12, 4, 20, 50, 37, tzinfo=timezone.utc)),  # no fraction
    ("2026-12-04T20:50:37.123456Z", datetime(2026, 12, 4, 20, 50, 37, 123456, timezone.utc)),
    ("Fri, 04 Dec 2026 20:50:37 GMT", datetime(2026, 12, 4, 20, 50, 37, tzinfo=timezone.utc)),  # a header
    ("2026-12-04T22:50:37+02:00", datetime(2026, 12, 4, 20, 50, 37, tzinfo=timezone.utc)),
])
def test_each_form_is_the_same_instant(text, expected):
    parsed = _parse_timestamp(text)
    assert parsed == expected and parsed.utcoffset() is not None


def test_a_malformed_iso_time_goes_to_botocore():
    # not Python's ISO form, but dateutil reads it: the same answer as before this parser existed
    assert _parse_timestamp("2026-12-04T20:50:37.1234567Z") - datetime(2026, 12, 4, 20, 50, 37, tzinfo=timezone.utc) \
        < timedelta(seconds=1)
