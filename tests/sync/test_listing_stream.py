"""The destination listing parses the same fed in any pieces, and a cut-off listing is refused."""

from __future__ import annotations

import pytest

from gpuflow.errors import RemoteCommandFailed
from gpuflow.sync.exchange import ListingParser, parse_find_listing
from gpuflow.sync.plan import DestinationEntry

LISTING = (
    b"d\x00755\x004096\x001700000000.1234567890\x00\x00pkg\x00"
    b"f\x00644\x002500\x001700000000.0000000000\x00\x00pkg/a.py\x00"
    b"l\x00777\x007\x001600000000.5\x00a.py\x00pkg/link\x00"
    b"f\x00600\x001\x0012\x00\x00caf\xc3\xa9 \xff\x00"
)
EXPECTED = {
    "pkg": DestinationEntry("dir", 0, 1_700_000_000_123_456_789),
    "pkg/a.py": DestinationEntry("file", 2500, 1_700_000_000_000_000_000, 0o644),
    "pkg/link": DestinationEntry("link", 0, 1_600_000_000_500_000_000, 0, "a.py"),
    "caf\u00e9 \udcff": DestinationEntry("file", 1, 12_000_000_000, 0o600),
}


@pytest.mark.parametrize("piece", [1, 5, 7, 64, len(LISTING)])
def test_pieces_parse_like_the_whole(piece: int) -> None:
    parser = ListingParser()
    for start in range(0, len(LISTING), piece):
        parser.feed(LISTING[start : start + piece])
    assert parser.close() == EXPECTED
    assert parse_find_listing(LISTING) == EXPECTED


@pytest.mark.parametrize("cut", [1, 3, 21])  # 20 would drop the last record whole
def test_a_cut_off_listing_is_refused(cut: int) -> None:
    parser = ListingParser()
    parser.feed(LISTING[:-cut])
    with pytest.raises(RemoteCommandFailed, match="cut short"):
        parser.close()
