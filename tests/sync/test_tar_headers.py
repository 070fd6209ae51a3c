"""The tar stream's hand-built headers are byte for byte what tarfile writes, and GNU tar unpacks them."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile

import pytest

from gpuflow.sync.ignore import LocalEntry, scan_tree
from gpuflow.sync.transfer import _member_header, _tarfile_header, stream_tar

ENTRIES = [
    LocalEntry("a.py", "file", 0, 1_700_000_000_123_456_789, 0o644),
    LocalEntry("pkg/module_0001.py", "file", 2500, 1_700_000_000_000_000_000, 0o755),
    LocalEntry("d/" + "n" * 97, "file", 1, 5, 0o600),  # exactly 100 bytes
    LocalEntry("d/" + "n" * 98, "file", 1, 5, 0o600),  # 101: a pax path record
    LocalEntry("caf\u00e9.txt", "file", 3, 1_600_000_000_500_000_000, 0o644),  # not ASCII
    LocalEntry("bad\udcff.txt", "file", 3, 1_600_000_000_500_000_000, 0o644),  # not UTF-8
    LocalEntry("link", "link", 0, 1_700_000_000_999_999_999, 0, "pkg/module_0001.py"),
    LocalEntry("longlink", "link", 0, 1_700_000_000_000_000_001, 0, "x/" * 60),
    LocalEntry("old", "file", 7, 9_000_000_001, 0o644),  # a short mtime: a short pax record
]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda entry: entry.path[:20])
def test_header_is_what_tarfile_writes(entry: LocalEntry) -> None:
    seconds, nanoseconds = divmod(entry.mtime_ns, 1_000_000_000)
    expected = _tarfile_header(entry, seconds, nanoseconds)
    built = _member_header(entry)
    if nanoseconds:
        assert built == expected
    else:  # whole seconds: the ustar header alone, the same as tarfile's last block
        assert built == expected[-512:]
        assert b"mtime=" in expected


def test_stream_round_trips_through_tarfile_and_gnu_tar(tmp_path) -> None:
    source = tmp_path / "src"
    (source / "pkg").mkdir(parents=True)
    contents = {"a.py": b"print(1)\n", "pkg/empty.txt": b"", "pkg/big.bin": os.urandom((1 << 20) + 700)}
    for name, data in contents.items():
        (source / name).write_bytes(data)
    os.utime(source / "a.py", ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    os.chmod(source / "a.py", 0o751)
    (source / "pkg" / "link").symlink_to("empty.txt")
    tree = scan_tree(source)
    stream = io.BytesIO()
    assert stream_tar(source, tree.entries, stream, None) is None
    with tarfile.open(fileobj=io.BytesIO(stream.getvalue())) as archive:
        for entry in tree.entries:
            member = archive.getmember(entry.path)
            assert float(member.pax_headers.get("mtime", member.mtime)) == pytest.approx(entry.mtime_ns / 1e9)
            if entry.kind == "link":
                assert member.issym() and member.linkname == "empty.txt"
            else:
                assert archive.extractfile(member).read() == contents[entry.path]
                assert member.mode == entry.mode
    target = tmp_path / "dst"
    target.mkdir()
    subprocess.run(["tar", "-xpf", "-"], input=stream.getvalue(), cwd=target, check=True)
    for entry in tree.entries:
        status = os.lstat(target / entry.path)
        assert status.st_mtime_ns == entry.mtime_ns
    assert (target / "pkg" / "big.bin").read_bytes() == contents["pkg/big.bin"]
