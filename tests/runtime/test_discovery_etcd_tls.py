"""etcd over TLS: a real etcd serving https with a certificate from a CA made here by openssl."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from dynamo_lite.runtime.discovery_etcd import EtcdDiscovery, EtcdTls
from tests.conftest import free_port, spawn, wait_until

pytestmark = pytest.mark.skipif(
    not (shutil.which("etcd") and shutil.which("openssl")), reason="needs the etcd and openssl binaries"
)


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=dl-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    )
    return d / "ca.pem", d / "server.pem", d / "server.key"


@pytest.fixture
def tls_etcd(tmp_path: Path):
    ca, cert, key = make_certs(tmp_path)
    port, peer = free_port(), free_port()
    proc = spawn(
        "etcd-tls",
        [
            "etcd",
            "--name",
            "tls",
            "--data-dir",
            str(tmp_path / "data"),
            "--listen-client-urls",
            f"https://127.0.0.1:{port}",
            "--advertise-client-urls",
            f"https://127.0.0.1:{port}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"tls=http://127.0.0.1:{peer}",
            "--cert-file",
            str(cert),
            "--key-file",
            str(key),
        ],
        tmp_path,
    )
    try:
        wait_until(
            lambda: "serving client traffic securely" in proc.log() or "ready to serve" in proc.log(),
            20,
            what="etcd with TLS",
        )
        yield port, ca
    finally:
        proc.kill()
        proc.popen.wait(5)


async def test_discovery_over_tls_verifies_the_server(tls_etcd) -> None:
    port, ca = tls_etcd
    discovery = await EtcdDiscovery.connect(f"https://127.0.0.1:{port}", ttl_s=5, tls=EtcdTls(str(ca)))
    try:
        await discovery.put("dl/tls/key", b"value")
        listed = await discovery.get_prefix("dl/tls/")
        assert [(e.key, e.value) for e in listed] == [("dl/tls/key", b"value")]
    finally:
        await discovery.close()


async def test_plaintext_client_cannot_talk_to_a_tls_etcd(tls_etcd) -> None:
    port, _ = tls_etcd
    with pytest.raises((ConnectionError, TimeoutError)):
        discovery = await EtcdDiscovery.connect(f"127.0.0.1:{port}", ttl_s=5, timeout_s=2.0)
        await discovery.close()
