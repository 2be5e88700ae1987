"""A commit record that got no answer (issue #10): the session's next cycle fences first.

A commit record the receiver did not answer in time (``copier.receiver.Link.commit``:
``unsettled``) may still be acted on later, and would then make RP N of whatever the next
cycle wrote meanwhile over the same data connections. So the session closes its data
connections (replication/driver.py) and the next copy fences first: a late record then
covers only its own cycle, or is refused as older than the fence.

Real processes: a source replicating through a proxy (nbdkit's nbd plugin) that delays every
write, to a receiver that the test stops (SIGSTOP) once the source flushed a cycle, so that
the proxy hands it the commit record while it is stopped.
"""
import os
import subprocess
import time

import psutil

from conftest import Server, make_image, nbdrep, uri, wait_until
from copier.receiver import META_SIZE
from nbd_plugin import control
from test_receiver import BLOCK, MiB, Receiver, generation, write_image
from test_receiver_fence import queued

SIZE = MiB
# The proxy holds every write this long: the window, after the source flushed a cycle, in
# which the test stops the receiver before the commit record reaches it.
DELAY_MS = 1500
RECORD = 28 + META_SIZE   # an NBD write request: its header and a metadata block


def waiting(pid):
    """Connections waiting to be accepted on the unix listeners of process ``pid`` (ss shows
    a listener's backlog as its Recv-Q)."""
    out = subprocess.run(["ss", "-xlnpH"], capture_output=True, text=True, check=True, timeout=30).stdout
    return sum(int(line.split()[2]) for line in out.splitlines() if f"pid={pid}," in line)


def committed(server):
    """The newest cycle the source counts committed: flushed to the replica, whether or not
    the receiver took its commit record yet."""
    return control.request(server.control, {"cmd": "status"}, 10)["committed_cycle"] or 0


def test_after_an_unanswered_commit_the_next_cycle_fences_before_it_writes(procs, nbdkit, tmp_path, capfd):
    """Generation 2's cycle N is copied and flushed, then its commit record is held in the
    stopped receiver past the source's metadata timeout. While the receiver is still stopped
    the source copies generation 3 (cycle N+1): it must first open a new connection for the
    fence and send nothing on the connections of cycle N. After SIGCONT the receiver acts on
    the late record (over generation 2 alone) or refuses it; it fences, takes cycle N+1, ends
    equal to the source, and every RP it holds is exactly one generation."""
    tmp, logged = str(tmp_path), []

    def log():   # what the source and the receiver logged so far (they write to our stderr)
        logged.append(capfd.readouterr().err)
        return "".join(logged)

    r = Receiver(procs, tmp, [make_image(str(tmp_path / "target.img"), SIZE)])
    psock, _ = nbdkit("--filter=delay", "nbd", f"socket={r.sock}", "dynamic-export=true",
                      f"delay-write={DELAY_MS}ms")
    src = make_image(str(tmp_path / "source.img"), SIZE)
    server = Server(procs, tmp, [src], [uri(psock)], extra=["--cycle", "3600"])
    images = {bytes(SIZE): 0}
    for g in (1, 2, 3):
        images[generation(g, SIZE)] = g
    write_image(server.sock, generation(1, SIZE))
    one = server.rp()
    receiver = psutil.Process(r.proc.pid).children()[0]   # nbdkit, which holds the sockets

    write_image(server.sock, generation(2, SIZE))
    nbdrep("rp", "--control", server.control)   # does not wait for the commit
    wait_until(lambda: committed(server) > one, 60, "generation 2 flushed to the receiver")
    receiver.suspend()
    try:
        two = committed(server)
        wait_until(lambda: queued(receiver.pid) >= RECORD, 30,
                   "the commit record waiting in the stopped receiver (if it never comes, the "
                   "receiver took it before the SIGSTOP)")
        # New connections fail at once, so the source's second attempt at the record does
        # not wait out its handshake timeout too.
        os.rename(psock, psock + ".away")
        try:
            wait_until(lambda: f"did not take the commit of cycle {two} " in log(), 60,
                       "the source giving up on the commit record")
        finally:
            os.rename(psock + ".away", psock)
        mark = len(log())
        held, connecting = queued(receiver.pid), waiting(receiver.pid)
        write_image(server.sock, generation(3, SIZE))
        nbdrep("rp", "--control", server.control)
        wait_until(lambda: waiting(receiver.pid) > connecting or queued(receiver.pid) >= held + BLOCK,
                   60, "the source's next cycle reaching the receiver")
        # A new connection shows at once, but the proxy holds writes DELAY_MS: writes on the
        # old connections would arrive up to that late, so watch them that long and a second
        # more (an absence can only be watched for, over a bounded window).
        deadline = time.monotonic() + DELAY_MS / 1000 + 1
        while True:
            sent = queued(receiver.pid) - held
            assert sent < BLOCK, (f"cycle {two + 1} sent {sent} bytes on connections of cycle {two}, "
                                  "whose commit record may still land: no fence first")
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
    finally:
        receiver.resume()
    wait_until(lambda: committed(server) > two, 60, "generation 3 committed on the source")
    r.wait_committed(committed(server))
    assert "fenced" in log()[mark:], "the receiver took the next cycle without a fence"
    out = nbdrep("verify", server.uri, r.uri(), check=False)
    assert out.returncode == 0, out.stdout
    rps = r.status()["rps"]
    shown = [images.get(r.read(f"@{rp['cycle']}", SIZE), "a mix") for rp in rps]
    # RP ``two``: the late record landed before the fence (generation 2 alone) or was refused.
    assert shown in ([0, 1, 2, 3], [0, 1, 3]), list(zip([rp["cycle"] for rp in rps], shown))
