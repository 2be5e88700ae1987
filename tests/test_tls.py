"""TLS: `nbdrep serve --tls ...` for hosts, `nbds://` URIs for the replica link (PSK, through libnbd)."""
import os
import shutil
import subprocess

import nbd
import pytest

from conftest import Server, make_image, nbdrep, nbdrep_cmd, run, wait_until
from nbd_plugin import control

MiB = 1 << 20
USER = "alice"


def psk_file(path, key_byte):
    """A gnutls PSK file (``USERNAME:HEXKEY``, what ``psktool -u alice -p FILE`` writes)."""
    with open(path, "w") as f:
        f.write(f"{USER}:{key_byte * 32}\n")
    return str(path)


def tls_uri(sock, psk, export=""):
    return f"nbds+unix://{USER}@/{export}?socket={sock}&tls-psk-file={psk}"


def connect(nbd_uri):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(nbd_uri)
    return h


@pytest.fixture
def tls_server(procs, tmp_path):
    """``nbdrep serve`` requiring TLS with a PSK, without replication; returns (server, psk, source)."""
    psk = psk_file(tmp_path / "keys.psk", "ab")
    src = make_image(str(tmp_path / "source.img"), 4 * MiB, random_mib=1)
    return Server(procs, str(tmp_path), [src], extra=["--tls-psk", psk]), psk, src


def test_plain_client_is_refused_when_tls_is_required(tls_server):
    server, psk, src = tls_server
    with pytest.raises(nbd.Error):
        connect(server.uri)
    h = connect(tls_uri(server.sock, psk))
    with open(src, "rb") as f:
        assert h.pread(MiB, 0) == f.read(MiB)
    assert h.get_tls_negotiated()
    h.shutdown()


def test_a_wrong_psk_is_refused(tls_server, tmp_path):
    server, psk, _ = tls_server
    connect(tls_uri(server.sock, psk)).shutdown()
    wrong = psk_file(tmp_path / "wrong.psk", "cd")
    with pytest.raises(nbd.Error):
        connect(tls_uri(server.sock, wrong))


def test_replication_over_tls_equals_the_source(procs, nbdkit, tmp_path):
    """Both links over TLS: the host writes through nbds://, nbdrep copies to a replica that
    requires TLS, and `nbdrep verify` compares them over TLS too."""
    psk = psk_file(tmp_path / "keys.psk", "ab")
    src = make_image(str(tmp_path / "source.img"), 8 * MiB, random_mib=2)
    dst = make_image(str(tmp_path / "replica.img"), 8 * MiB)
    rsock, _ = nbdkit("--tls=require", f"--tls-psk={psk}", "file", dst)
    with pytest.raises(nbd.Error):
        connect(f"nbd+unix:///?socket={rsock}")
    server = Server(procs, str(tmp_path), [src], [tls_uri(rsock, psk)],
                    extra=["--tls", "require", "--tls-psk", psk, "--cycle", "0.2"])
    h = connect(tls_uri(server.sock, psk))
    for i in range(16):
        h.pwrite(os.urandom(4096 * (i + 1)), i * 300 * 1024 + 512)
    h.flush()
    server.rp()
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert a.read() == b.read()
    done = nbdrep("verify", "--quiet", tls_uri(server.sock, psk), tls_uri(rsock, psk), check=False)
    assert done.returncode == 0, done.stderr
    h.shutdown()


@pytest.fixture
def certificates(tmp_path):
    """An X.509 CA and what certtool (gnutls-bin) makes with it, as nbdkit and libnbd read them:
    ``server/`` (ca-cert.pem, server-cert.pem, server-key.pem), ``client/`` (ca-cert.pem,
    client-cert.pem, client-key.pem) and ``anonymous/`` (ca-cert.pem only)."""
    root = tmp_path / "pki"
    dirs = {name: root / name for name in ("server", "client", "anonymous")}
    for d in dirs.values():
        d.mkdir(parents=True)
    templates = {
        "ca": "cn = nbdrep test CA\nca\ncert_signing_key\nexpiration_days = 2\n",
        "server": "cn = localhost\ndns_name = localhost\ntls_www_server\nencryption_key\n"
                  "signing_key\nexpiration_days = 2\n",
        "client": "cn = client\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n",
    }
    for name, text in templates.items():
        (root / f"{name}.info").write_text(text)
    ca_key, ca_cert = root / "ca-key.pem", dirs["server"] / "ca-cert.pem"
    run("certtool", "--generate-privkey", "--outfile", str(ca_key))
    run("certtool", "--generate-self-signed", "--load-privkey", str(ca_key),
        "--template", str(root / "ca.info"), "--outfile", str(ca_cert))
    for name in ("server", "client"):
        key, cert = dirs[name] / f"{name}-key.pem", dirs[name] / f"{name}-cert.pem"
        run("certtool", "--generate-privkey", "--outfile", str(key))
        run("certtool", "--generate-certificate", "--load-privkey", str(key),
            "--load-ca-certificate", str(ca_cert), "--load-ca-privkey", str(ca_key),
            "--template", str(root / f"{name}.info"), "--outfile", str(cert))
    for name in ("client", "anonymous"):
        shutil.copy(ca_cert, dirs[name] / "ca-cert.pem")
    return {name: str(d) for name, d in dirs.items()}


def test_x509_with_verify_peer_needs_a_client_certificate(procs, tmp_path, certificates):
    src = make_image(str(tmp_path / "source.img"), MiB, random_mib=1)
    server = Server(procs, str(tmp_path), [src],
                    extra=["--tls-certificates", certificates["server"], "--tls-verify-peer"])
    x509 = lambda name: f"nbds+unix:///?socket={server.sock}&tls-certificates={certificates[name]}"  # noqa: E731
    h = connect(x509("client"))
    with open(src, "rb") as f:
        assert h.pread(4096, 0) == f.read(4096)
    h.shutdown()
    for refused in (x509("anonymous"), server.uri):
        with pytest.raises(nbd.Error):
            connect(refused)


@pytest.mark.parametrize("argv, message", [
    (["--tls", "require"], "--tls require needs exactly one of --tls-psk FILE and --tls-certificates DIR"),
    (["--tls", "off", "--tls-psk", "PSK"], "--tls off contradicts --tls-psk"),
    (["--tls-psk", "PSK", "--tls-verify-peer"], "--tls-verify-peer needs --tls-certificates"),
    (["--tls-verify-peer"], "--tls-verify-peer needs --tls-certificates"),   # not "--tls off"
    (["--tls-psk", "MISSING"], "No such file or directory"),
    (["--tls-psk", "NOT_PSK"], "not a PSK file (want USERNAME:HEXKEY lines; line 1 is not)"),
    (["--tls-certificates", "CERTS"], "cannot read ca-cert.pem, server-cert.pem, server-key.pem"),
])
def test_bad_tls_options_are_one_line_and_write_nothing(tmp_path, argv, message):
    paths = {"PSK": psk_file(tmp_path / "keys.psk", "ab"), "MISSING": str(tmp_path / "none.psk"),
             "NOT_PSK": str(tmp_path / "source.img"), "CERTS": str(tmp_path)}
    src = make_image(str(tmp_path / "source.img"), MiB)
    before = sorted(os.listdir(tmp_path))
    done = nbdrep("serve", "--source", src, "--socket", str(tmp_path / "s.sock"),
                  "--state", str(tmp_path / "state"), *[paths.get(a, a) for a in argv], check=False)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_replication_to_a_receiver_over_tls(procs, tmp_path):
    """`nbdrep receive --tls-psk` (the receiver's listener takes serve's TLS options): the
    source replicates to it over nbds://, a plain client is refused, and the committed RP
    read back over TLS equals the source."""
    psk = psk_file(tmp_path / "keys.psk", "ab")
    src = make_image(str(tmp_path / "source.img"), 4 * MiB, random_mib=4)
    target = make_image(str(tmp_path / "target.img"), 4 * MiB)
    rsock, rcontrol = str(tmp_path / "receiver.sock"), str(tmp_path / "receiver-control.sock")
    procs.start(nbdrep_cmd("receive", "--target", target, "--socket", rsock, "--control", rcontrol,
                           "--state", str(tmp_path / "receiver-state"), "--tls-psk", psk),
                wait_for=rcontrol, stdout=subprocess.DEVNULL)
    with pytest.raises(nbd.Error):
        connect(f"nbd+unix:///?socket={rsock}")
    server = Server(procs, str(tmp_path), [src], [tls_uri(rsock, psk)], extra=["--cycle", "3600"])
    cycle = server.rp()
    wait_until(lambda: (control.request(rcontrol, {"cmd": "status"}, 10)["committed_cycle"] or 0)
               >= cycle, 60, f"cycle {cycle} committed on the receiver")
    h = connect(tls_uri(rsock, psk))
    with open(src, "rb") as f:
        assert h.pread(4 * MiB, 0) == f.read()
    h.shutdown()
