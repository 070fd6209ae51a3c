"""The trailer after a streamed file's bytes (its sha256 as the streamer read it, and a
flag: it changed while read) decides what may be placed: a damaged, flagged, cut or
garbled trailer never yields a verified file, and no partial file is left behind."""

from __future__ import annotations

import hashlib

import pytest

from gpuflow.transport import filestream

BODY = b"checkpoint bytes " * 1000


def _frame(body: bytes, digest: bytes, flag: bytes = b"\0") -> bytes:
    return b"F" + len(body).to_bytes(8, "big") + body + digest + flag


def _receive(tmp_path, stream: bytes):
    pieces = [stream[index : index + 4096] for index in range(0, len(stream), 4096)] + [b""]
    return list(filestream.receive(lambda count: pieces.pop(0), [("a", str(tmp_path / "a.part"))]))


def test_a_good_trailer_verifies_the_bytes_that_landed(tmp_path):
    [fetched] = _receive(tmp_path, _frame(BODY, hashlib.sha256(BODY).digest()) + b"Z")
    assert fetched.sha256 == hashlib.sha256(BODY).hexdigest()
    assert (tmp_path / "a.part").read_bytes() == BODY


def test_a_digest_that_does_not_match_the_bytes_is_refused(tmp_path):
    damaged = bytearray(hashlib.sha256(BODY).digest())
    damaged[0] ^= 1
    [fetched] = _receive(tmp_path, _frame(BODY, bytes(damaged)) + b"Z")
    assert fetched.sha256 is None and "damaged" in fetched.reason


def test_bytes_damaged_on_the_way_are_refused(tmp_path):
    body = bytearray(BODY)
    body[5000] ^= 0xFF
    [fetched] = _receive(tmp_path, _frame(bytes(body), hashlib.sha256(BODY).digest()) + b"Z")
    assert fetched.sha256 is None and "damaged" in fetched.reason


def test_a_file_flagged_as_changed_while_read_is_not_verified(tmp_path):
    [fetched] = _receive(tmp_path, _frame(BODY, hashlib.sha256(BODY).digest(), b"\1") + b"Z")
    assert fetched.sha256 is None and "changed" in fetched.reason


@pytest.mark.parametrize("kept", [0, 1, 20, 32])  # the trailer cut: none of it, part of the digest, no flag
def test_a_cut_trailer_breaks_the_stream_and_leaves_no_partial_file(tmp_path, kept):
    stream = _frame(BODY, hashlib.sha256(BODY).digest())[: 9 + len(BODY) + kept]
    with pytest.raises(filestream.StreamBroken):
        _receive(tmp_path, stream)
    assert not (tmp_path / "a.part").exists()


def test_a_missing_end_mark_breaks_the_stream(tmp_path):
    with pytest.raises(filestream.StreamBroken):
        _receive(tmp_path, _frame(BODY, hashlib.sha256(BODY).digest()) + b"Q")
