"""Relay one guest NBD connection from qemu's guestfwd to the NBD server's unix socket.

qemu (libslirp) runs `guestfwd=...-cmd:` commands with stdin/stdout on one end of a *TCP*
loopback pair, not a socketpair, and never sets TCP_NODELAY on its own end. libslirp writes each
segment the guest sent as a separate send(); Nagle then holds the second one of a multi-segment
NBD write until the receiving end ACKs the first, and that end's delayed ACK waits 40 ms. So every
write request larger than one guest segment (1460 bytes) stalled 40 ms with `socat`, and
`socat -,tcp-quickack` did not help because Linux leaves quick-ACK mode again by itself.

This relay re-arms TCP_QUICKACK after every read from the guest side, which ACKs at once and
releases libslirp's held segment, and sets TCP_NODELAY on its own sends. Each direction is its own
blocking thread, so neither side's backlog can stall the other (a single select loop with blocking
sends could deadlock when the kernel client has many read replies in flight). EOF in one direction
is passed on as a half-close; the process ends when both directions ended.

Usage (by guest.py): python3 -I -S guest_relay.py SOCKET, with stdin a connected TCP socket.
Only the standard library, and no site import, so it starts in a few milliseconds. It never
prints: libslirp points its stderr at the guest's connection too, where text would be garbage.
"""

import socket
import sys
import threading

CHUNK = 1 << 18


def pump(src: socket.socket, dst: socket.socket, quickack: bool) -> None:
    """Copy src to dst until EOF or error, then half-close dst. O(bytes)."""
    # A reset from either end is how a connection ends when qemu or the server is killed; the
    # half-close passes it on, and there is nobody to tell anything else to.
    try:
        while data := src.recv(CHUNK):
            if quickack:
                src.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _shutdown_write(dst)


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def main(path: str) -> int:
    """Relay until both directions ended; 1 if either end cannot be set up. O(bytes)."""
    try:
        guest = socket.socket(fileno=0)
        guest.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.connect(path)
    except OSError:
        return 1
    upstream = threading.Thread(target=pump, args=(guest, server, True), daemon=True)
    upstream.start()
    pump(server, guest, False)
    upstream.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
