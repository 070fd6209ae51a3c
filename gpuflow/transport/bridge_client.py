"""The ``ssh`` stand-in a command's shared connection hands to programs that exec ssh (sync, rsync's ``-e``).

Run as a script (``python3 -I -S bridge_client.py SOCKET [ssh options] HOST COMMAND...``),
never imported: it uses the standard library only, so it starts in a few
milliseconds.  Like ``ssh HOST COMMAND...`` it runs COMMAND (its words joined by
spaces, as ssh joins them) on the node, with this process's stdin, stdout and
stderr, and exits with the command's exit status, 255 when the connection
failed.  It does not connect anywhere itself: it hands its three descriptors
and the command to the gpuflow process that owns SOCKET
(:mod:`gpuflow.transport.shared`), which runs the command on a new channel of
its one SSH connection to the node and answers with the exit status.
"""

import os
import signal
import socket
import struct
import sys

_OPTIONS_WITH_VALUE = ("-o", "-l", "-p", "-i", "-F")


def main(argv):
    if len(argv) < 2:
        sys.stderr.write("gpuflow bridge: usage: bridge_client.py SOCKET HOST COMMAND...\n")
        return 255
    words = argv[1:]
    while words and words[0].startswith("-"):  # options rsync or a caller may put before the host
        words = words[2:] if words[0] in _OPTIONS_WITH_VALUE else words[1:]
    command = " ".join(words[1:]).encode()
    if not command:
        sys.stderr.write("gpuflow bridge: no command (an interactive shell needs `gpuflow ssh`)\n")
        return 255
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(argv[0])
        socket.send_fds(connection, [struct.pack("!Q", len(command))], [0, 1, 2])
        connection.sendall(command)
        answer = b""
        while len(answer) < 4:
            chunk = connection.recv(4 - len(answer))
            if not chunk:
                break
            answer += chunk
    except OSError as exc:
        sys.stderr.write(f"gpuflow bridge: the command's SSH connection is gone ({exc})\n")
        return 255
    if len(answer) < 4:
        sys.stderr.write("gpuflow bridge: the command's SSH connection ended without an exit status\n")
        return 255
    return struct.unpack("!i", answer)[0] & 0xFF


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends it as it ends ssh: at once, silently
    os.umask(0o077)
    sys.exit(main(sys.argv[1:]))
