"""gRPC over TLS (tritonserver's --grpc-use-ssl, --grpc-use-ssl-mutual and the PEM flags),
with one gRPC process and with two frontends, against tritonclient's own TLS options.
The certificates are made in the test (a CA, a server certificate for 127.0.0.1, a client
certificate)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tritonclient.utils import InferenceServerException

from shmserve.tests.serverproc import ServerProcess, build_repository
from shmserve.tests.simple_calls import infer_simple


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


Issuer = tuple[x509.Name, ec.EllipticCurvePrivateKey]


def _issue(folder: Path, stem: str, subject: str, issuer: Issuer | None, ca: bool = False,
           server: bool = False) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(subject)
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    certificate = builder.sign(issuer_key, hashes.SHA256())
    (folder / f"{stem}.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return name, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    authority = _issue(folder, "ca", "shmserve test CA", None, ca=True)
    _issue(folder, "server", "127.0.0.1", authority, server=True)
    _issue(folder, "client", "a client", authority)
    _issue(folder, "stranger", "a stranger", None)   # self-signed: not from the CA
    return folder


def _tls_flags(pki: Path, mutual: bool = False) -> list[str]:
    flags = ["--grpc-use-ssl=true", f"--grpc-server-cert={pki / 'server.crt'}",
             f"--grpc-server-key={pki / 'server.key'}"]
    if mutual:
        flags += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={pki / 'ca.crt'}"]
    return flags


def _credentials(pki: Path, client: str | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        (pki / "ca.crt").read_bytes(),
        None if client is None else (pki / f"{client}.key").read_bytes(),
        None if client is None else (pki / f"{client}.crt").read_bytes())


def _client(server: ServerProcess, pki: Path, client: str | None = None
            ) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        server.url, ssl=True, root_certificates=str(pki / "ca.crt"),
        private_key=None if client is None else str(pki / f"{client}.key"),
        certificate_chain=None if client is None else str(pki / f"{client}.crt"))


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_tls(tmp_path: Path, pki: Path, frontends: str) -> None:
    repo = build_repository(tmp_path / "repo", ["simple"])
    with ServerProcess(repo, *_tls_flags(pki), "--grpc-frontends", frontends) as server:
        server.wait_ready(credentials=_credentials(pki))
        with _client(server, pki) as client:
            assert client.is_server_ready()
            infer_simple(client)
        with grpcclient.InferenceServerClient(server.url) as plaintext, \
                pytest.raises(InferenceServerException) as refused:
            plaintext.is_server_live(client_timeout=5)
        assert refused.value.status() in ("StatusCode.UNAVAILABLE",
                                          "StatusCode.DEADLINE_EXCEEDED")


def test_mutual_tls_wants_a_client_certificate_from_the_ca(tmp_path: Path, pki: Path) -> None:
    repo = build_repository(tmp_path / "repo", ["simple"])
    with ServerProcess(repo, *_tls_flags(pki, mutual=True)) as server:
        server.wait_ready(credentials=_credentials(pki, "client"))
        with _client(server, pki, "client") as client:
            infer_simple(client)
        for who in (None, "stranger"):
            with _client(server, pki, who) as client, \
                    pytest.raises(InferenceServerException) as refused:
                client.is_server_live(client_timeout=5)
            assert refused.value.status() in ("StatusCode.UNAVAILABLE",
                                              "StatusCode.DEADLINE_EXCEEDED"), who


@pytest.mark.parametrize(("flags", "message"), [
    (["--grpc-use-ssl=true"], "gRPC over TLS needs --grpc-server-cert"),
    (["--grpc-use-ssl=true", "--grpc-server-cert=/nonexistent/server.crt",
      "--grpc-server-key=/nonexistent/server.key"],
     "cannot read --grpc-server-cert /nonexistent/server.crt"),
])
def test_unusable_tls_settings_stop_the_start(tmp_path: Path, flags: list[str],
                                              message: str) -> None:
    repo = build_repository(tmp_path / "repo", ["simple"])
    done = subprocess.run([sys.executable, "-m", "shmserve.daemon", "serve",
                           "--model-repository", str(repo), "--grpc-port", "0",
                           "--http-port", "0", "--metrics-port", "0", *flags],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert message in done.stderr
