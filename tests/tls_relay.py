"""A TLS-terminating TCP relay on 127.0.0.1, for tests: what an ingress or a load balancer does in front
of a Ray dashboard. Clients speak TLS to the relay; it speaks plain TCP to the target port.

``self_signed_certificate(directory)`` writes a certificate for 127.0.0.1 / localhost and its key;
``TlsRelay(target_port, cert, key)`` is a context manager whose ``port`` accepts TLS connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
import threading
from pathlib import Path

CHUNK = 64 * 1024


def self_signed_certificate(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> tuple[Path, Path]:
    """(certificate.pem, key.pem) of a self-signed certificate valid for ``hosts`` (IP addresses or DNS
    names); the certificate is its own CA, so it is also the CA bundle a client trusts it with."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([_general_name(host) for host in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def _general_name(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():  # plain TCP: pass the half-close on; a TLS stream is closed below
            writer.write_eof()
    except (ConnectionError, ssl.SSLError):
        pass


class TlsRelay:
    """TLS on ``127.0.0.1:port`` relayed to plain TCP on ``127.0.0.1:target_port``, in a thread of its own."""

    def __init__(self, target_port: int, certfile: Path, keyfile: Path):
        self.target_port = target_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(certfile), str(keyfile))
        self.port = 0
        self.connections = 0  # TLS connections accepted (handshake done)
        self._loop = asyncio.new_event_loop()
        # a client that does not trust the certificate aborts the handshake: expected here, not worth a log line
        self._loop.set_exception_handler(lambda loop, context: None)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),),
                                        name="tls-relay", daemon=True)
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections += 1
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                return
            to_upstream = asyncio.create_task(_pipe(client_reader, up_writer))
            to_client = asyncio.create_task(_pipe(up_reader, client_writer))
            try:
                # the target closes when it is done (or once the client's half-close reached it)
                await asyncio.wait({to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED)
                if not to_client.done():
                    await asyncio.wait({to_client}, timeout=10)
            finally:
                for pipe in (to_upstream, to_client):
                    pipe.cancel()
                await asyncio.gather(to_upstream, to_client, return_exceptions=True)
                up_writer.close()
        finally:
            client_writer.close()
            with contextlib.suppress(Exception):
                await client_writer.wait_closed()
            self._tasks.discard(task)

    def __enter__(self) -> TlsRelay:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the TLS relay did not start")
        return self

    def __exit__(self, *exc_info) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self._loop.close()
