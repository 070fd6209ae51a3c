"""Host keys from console output, and the per-cluster known_hosts file (no network)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gpuflow.transport import hostkeys
from tests.transport.console_sample import console_output, fingerprint_line


@pytest.fixture(scope="module")
def host_keys(tmp_path_factory):
    """Real ed25519, ECDSA and RSA public keys, as an instance's /etc/ssh holds them."""
    directory = tmp_path_factory.mktemp("host-keys")
    files = []
    for key_type, bits in (("ecdsa", "256"), ("ed25519", None), ("rsa", "2048")):
        path = directory / f"ssh_host_{key_type}_key"
        command = ["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", "root@ip-172-31-5-9", "-f", str(path)]
        if bits:
            command += ["-b", bits]
        subprocess.run(command, check=True)
        files.append(Path(f"{path}.pub"))
    return files


def _keys_and_fingerprints(files):
    return [f.read_text().strip() for f in files], [fingerprint_line(f) for f in files]


@pytest.mark.parametrize("prefix", ["<14>Nov 28 01:02:03 ec2: ", "ec2: ", ""])
def test_cloud_init_console_yields_every_host_key_with_its_ssh_keygen_fingerprint(host_keys, prefix):
    keys, fingerprints = _keys_and_fingerprints(host_keys)
    found = hostkeys.parse_console_output(console_output(keys, fingerprints, syslog_prefix=prefix))
    assert [f"{key.key_type} {key.key_base64} {key.comment}" for key in found.keys] == keys
    # our fingerprints equal ssh-keygen's, character for character
    assert [key.fingerprint for key in found.keys] == [line.split()[1] for line in fingerprints]
    assert list(found.fingerprints) == [line.split()[1] for line in fingerprints]


def test_keys_block_with_prefixed_lines_and_the_last_complete_block_wins(host_keys):
    keys, fingerprints = _keys_and_fingerprints(host_keys)
    first_boot = console_output(keys[:1], fingerprints[:1])
    rebooted = console_output(keys[1:2], fingerprints[1:2], syslog_prefix="ec2: ")
    prefixed_keys = rebooted.replace(keys[1], "ec2: " + keys[1])
    truncated = "-----BEGIN SSH HOST KEY KEYS-----\r\n" + keys[2]  # cut off by EC2's 64 KB limit
    found = hostkeys.parse_console_output(first_boot + "\r\n" + prefixed_keys + "\r\n" + truncated)
    assert [key.fingerprint for key in found.keys] == [fingerprints[1].split()[1]]


def test_mangled_or_contradicted_keys_are_never_pinned(host_keys):
    keys, fingerprints = _keys_and_fingerprints(host_keys)
    key_type, body, comment = keys[1].split()
    mangled = f"{key_type} {body[:-8]}AAAAAAAA {comment}"  # corrupted on the serial line
    wrong_type = f"ssh-rsa {body} {comment}"  # the blob says ed25519
    found = hostkeys.parse_console_output(console_output([mangled, wrong_type, keys[0]], fingerprints))
    assert [key.key_type for key in found.keys] == ["ecdsa-sha2-nistp256"]
    # A key absent from the same boot's fingerprints block is dropped.
    found = hostkeys.parse_console_output(console_output(keys, fingerprints[:1]))
    assert [key.fingerprint for key in found.keys] == [fingerprints[0].split()[1]]


def test_console_without_keys_yet_or_with_fingerprints_only(host_keys):
    keys, fingerprints = _keys_and_fingerprints(host_keys)
    booting = "\r\n".join(console_output(keys, fingerprints).split("\r\n")[:4])
    assert hostkeys.parse_console_output(booting).empty
    assert hostkeys.parse_console_output("").empty
    only_fingerprints = hostkeys.parse_console_output(console_output(keys, fingerprints, include_keys=False))
    assert only_fingerprints.keys == () and len(only_fingerprints.fingerprints) == 3


def test_pinning_replaces_only_that_host_and_port_atomically(tmp_path, host_keys):
    keys = [hostkeys.parse_public_key(f.read_text()) for f in host_keys]
    path = tmp_path / "known_hosts" / "demo"
    hostkeys.pin_host_keys(path, "203.0.113.7", 22, keys[:2])
    hostkeys.pin_host_keys(path, "203.0.113.8", 2222, keys[2:])
    assert hostkeys.pinned_keys(path, "203.0.113.7") == keys[:2]
    assert hostkeys.pinned_keys(path, "203.0.113.8", 2222) == keys[2:]
    assert hostkeys.pinned_keys(path, "203.0.113.8") == []  # port 22 is another host
    hostkeys.pin_host_keys(path, "203.0.113.7", 22, keys[2:])
    assert hostkeys.pinned_keys(path, "203.0.113.7") == keys[2:]
    assert hostkeys.pinned_keys(path, "203.0.113.8", 2222) == keys[2:]
    lines = path.read_text().splitlines()
    assert lines[0].startswith("[203.0.113.8]:2222 ssh-rsa ") and lines[1].startswith("203.0.113.7 ssh-rsa ")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(ValueError):
        hostkeys.pin_host_keys(path, "203.0.113.9", 22, [])


def test_openssh_reads_the_pinned_file(tmp_path, host_keys):
    keys = [hostkeys.parse_public_key(f.read_text()) for f in host_keys]
    path = tmp_path / "known_hosts"
    hostkeys.pin_host_keys(path, "127.0.0.1", 2200, keys)
    listed = subprocess.run(
        ["ssh-keygen", "-F", "[127.0.0.1]:2200", "-f", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert all(key.key_base64 in listed for key in keys)
