"""A real redis-server on a free port, in a temporary directory, that tests may kill.

Where no ``redis-server`` binary exists the Redis tests skip, saying how to
enable them, unless ``WSRELAY_REQUIRE_REDIS=1`` (set by ``.ci/run``) makes that
a failure: in CI, nothing the Redis issue asks for may be skipped.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.utils import TIMEOUT, free_port

REQUIRED = os.environ.get("WSRELAY_REQUIRE_REDIS") == "1"


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        message = (
            "redis-server is not installed; install it (Debian: apt-get install redis-server) "
            "to run the Redis tests"
        )
        if REQUIRED:
            pytest.fail(message + " — WSRELAY_REQUIRE_REDIS=1 makes this a failure")
        pytest.skip(message)
    return path


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: a CA, and a certificate and key for 127.0.0.1 that it signed."""

    ca: str
    cert: str
    key: str

    @classmethod
    def create(cls, directory: Path) -> TlsFiles:
        """A throwaway CA and server certificate, made with ``cryptography``."""
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wsrelay test CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        files = cls(
            ca=str(directory / "ca.pem"),
            cert=str(directory / "redis.pem"),
            key=str(directory / "redis.key"),
        )
        Path(files.ca).write_bytes(ca_cert.public_bytes(pem))
        Path(files.cert).write_bytes(cert.public_bytes(pem))
        Path(files.key).write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        return files


class RedisServer:
    """One redis-server; :meth:`kill` and :meth:`start` again keep the port.

    With ``tls`` (a CA, and a certificate and key for 127.0.0.1 signed by it) it
    listens with TLS only, and :attr:`url` is a ``rediss://`` URL trusting the CA.
    """

    def __init__(self, *extra: str, tls: TlsFiles | None = None) -> None:
        self.binary = redis_binary()
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="wsrelay-redis-")
        self.extra = extra
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://127.0.0.1:{self.port}/0"

    def _listen_args(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        t = self.tls
        return [
            *("--port", "0", "--tls-port", str(self.port)),
            *("--tls-cert-file", t.cert, "--tls-key-file", t.key, "--tls-ca-cert-file", t.ca),
            *("--tls-auth-clients", "no"),
        ]

    def _ping(self) -> bool:
        with contextlib.ExitStack() as stack:
            s = stack.enter_context(socket.create_connection(("127.0.0.1", self.port), 0.2))
            if self.tls is not None:
                context = ssl.create_default_context(cafile=self.tls.ca)
                s = stack.enter_context(context.wrap_socket(s, server_hostname="127.0.0.1"))
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
            # +PONG, or -NOAUTH when a password is required: either way it is up
            return reply.startswith((b"+PONG", b"-NOAUTH"))

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                self.binary,
                *self._listen_args(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                if self._ping():
                    return self
            except OSError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.02)  # polling for the port to open, not waiting for delivery
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: the crash a node must survive."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
