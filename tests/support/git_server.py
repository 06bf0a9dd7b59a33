"""A private git host on loopback: ``git http-backend`` behind HTTPS with basic auth.

The tests' stand-in for a tenant's private repository host: a self-signed certificate for
127.0.0.1 (agents trust it through GIT_SSL_CAINFO), one user and password, and a switch that
answers the next fetches with 503 so a test can make an attempt fail and watch the retry.
"""
from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["PrivateGitHost", "self_signed_certificate"]


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate and key for IP 127.0.0.1, written under ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "git-host.crt", directory / "git-host.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format, *args):  # the test reads self.server.requests instead
        pass

    def do_GET(self):
        self._serve()

    def do_POST(self):
        self._serve()

    def _serve(self) -> None:
        host = self.server.host
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        authorized = self.headers.get("Authorization") == host.authorization
        with host.lock:
            host.requests.append((self.command, self.path, authorized))
            failing = authorized and host.fail_next > 0
            if failing:
                host.fail_next -= 1
        if not authorized:
            self._reply(401, b"", {"WWW-Authenticate": 'Basic realm="git"'})
            return
        if failing:
            self._reply(503, b"unavailable", {})
            return
        path, _, query = self.path.partition("?")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_PROJECT_ROOT": str(host.root),
               "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path, "QUERY_STRING": query,
               "REQUEST_METHOD": self.command, "REMOTE_USER": host.user, "REMOTE_ADDR": "127.0.0.1",
               "CONTENT_TYPE": self.headers.get("Content-Type") or "", "CONTENT_LENGTH": str(len(body))}
        for header in ("Content-Encoding", "Git-Protocol"):
            if self.headers.get(header):
                env["HTTP_" + header.upper().replace("-", "_")] = self.headers[header]
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = out.partition(b"\n\n")
        headers = dict(line.split(": ", 1) for line in head.decode("latin-1").splitlines() if ": " in line)
        status = int(headers.pop("Status", "200").split()[0])
        self._reply(status, payload, headers)

    def _reply(self, status: int, payload: bytes, headers: dict) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    host: PrivateGitHost


class PrivateGitHost:
    """Serves the bare repositories under ``root`` at ``https://127.0.0.1:<port>/<name>``."""

    def __init__(self, root: Path, certs: Path, user: str, password: str):
        self.root, self.user = root, user
        self.authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.requests: list[tuple[str, str, bool]] = []
        self.fail_next = 0
        self.lock = threading.Lock()
        self.cert, key = self_signed_certificate(certs)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.host = self
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> PrivateGitHost:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def publish(self, name: str, source: Path) -> str:
        """A bare copy of the working repository ``source``; returns its URL (no credentials)."""
        subprocess.run(["git", "clone", "-q", "--bare", str(source), str(self.root / name)], check=True)
        return f"https://127.0.0.1:{self.port}/{name}"

    def authorized_fetches(self) -> int:
        """Pack requests that carried the right credentials and were served."""
        return sum(1 for method, path, ok in self.requests if ok and method == "POST")
