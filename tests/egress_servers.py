"""Loopback servers for the network-policy tests: an HTTP server and a TLS server (with a test
CA made on the spot), each on its own 127.0.0.x address, and a hosts file the egress proxy
reads, naming test hosts that resolve to those addresses (or to refused ranges).

The servers run in threads, so that the supervisor's event loop under test is never the one
answering its own plugins. Nothing here touches the machine's network: 127.0.0.0/8 only.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import ssl
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HTTP_ADDRESS = "127.0.0.2"
TLS_ADDRESS = "127.0.0.3"
TLS_NAME = "tls.test"
# The host's allowed_hosts for these tests: what the test plugins' manifests may ask for
# (the proxy still refuses a listed name that resolves to loopback unless the plugin lists
# the address itself).
HOST_ALLOWED_HOSTS = ("allowed.test", "tls.test", "*.wild.test", "rebind.test", "mapped.test",
                      "private.test", "metadata.test", "127.0.0.0/8", "example.com")
# name -> address, as the egress proxy's hosts file says.
HOSTS = {
    "allowed.test": HTTP_ADDRESS,
    "a.wild.test": HTTP_ADDRESS,
    "deep.a.wild.test": HTTP_ADDRESS,
    "wild.test": HTTP_ADDRESS,
    "badwild.test": HTTP_ADDRESS,
    "rebind.test": HTTP_ADDRESS,          # a listed name that resolves to loopback
    "private.test": "10.11.12.13",        # ... to a private range
    "metadata.test": "169.254.169.254",   # ... to link-local (cloud metadata)
    "mapped.test": "::ffff:127.0.0.2",    # ... to loopback, spelled as IPv4-mapped IPv6
    TLS_NAME: TLS_ADDRESS,
}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        self.server.hits += 1  # type: ignore[attr-defined]
        if url.path == "/hello":
            self._send(200, f"hello from {self.server.name}".encode())  # type: ignore[attr-defined]
        elif url.path == "/headers":
            self._send(200, json.dumps(dict(self.headers.items())).encode(), "application/json")
        elif url.path == "/big":
            self._send(200, b"x" * int(query.get("n", ["0"])[0]))
        elif url.path == "/slow":
            time.sleep(float(query.get("s", ["1"])[0]))
            self._send(200, b"slow")
        elif url.path == "/binary":
            self._send(200, bytes(range(256)), "application/octet-stream")
        else:
            self._send(404, b"not found")

    def do_POST(self) -> None:
        self.server.hits += 1  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._send(200, body, self.headers.get("Content-Type", "application/octet-stream"))


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True

    def __init__(self, address: str, name: str, context: ssl.SSLContext | None = None) -> None:
        super().__init__((address, 0), _Handler)
        self.name = name
        self.hits = 0
        if context is not None:
            self.socket = context.wrap_socket(self.socket, server_side=True)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(5)


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for TLS_NAME and TLS_ADDRESS: (ca, cert, key)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sandboxer test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_NAME)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(TLS_NAME), x509.IPAddress(ipaddress.ip_address(TLS_ADDRESS))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    for path in paths:
        path.chmod(0o644)
    return paths


class LoopbackServers:
    """``http`` on 127.0.0.2 and ``tls`` on 127.0.0.3 (certificate for tls.test signed by
    ``ca_file``), and ``hosts_file`` mapping the test names. ``stop()`` when done."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_file, cert, key = make_certificates(directory)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.http = _Server(HTTP_ADDRESS, "http")
        self.tls = _Server(TLS_ADDRESS, "tls", context)
        self.hosts_file = directory / "hosts"
        self.hosts_file.write_text("".join(f"{addr} {name}\n" for name, addr in HOSTS.items()))
        self.hosts_file.chmod(0o644)

    def stop(self) -> None:
        self.http.stop()
        self.tls.stop()

    @staticmethod
    def busy() -> bool:
        """Whether a request handler thread still runs (holding its accepted socket)."""
        return any("process_request_thread" in t.name for t in threading.enumerate())
