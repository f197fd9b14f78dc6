"""Authentication and TLS for Chiron: bearer tokens on the client-facing APIs, TLS / mutual TLS on every gRPC hop.

Everything is read from the environment (:func:`security_settings`), so a parent process (``chiron up``, a Nomad
task) configures its children by exporting variables:

- ``CHIRON_AUTH_TOKENS``: comma-separated bearer tokens the client-facing APIs accept (the Router's gRPC services,
  the HTTP gateway); ``CHIRON_AUTH_TOKENS_FILE``: a file with one token per line (blank lines and ``#`` comments
  skipped), added to the former. None set: authentication is off.
- ``CHIRON_TOKEN``: the token this process sends when it calls the Router as a client (``chiron replay``, benches,
  the gateway when the caller sent none).
- ``CHIRON_TLS_CERT`` / ``CHIRON_TLS_KEY``: PEM certificate (chain) and private key. Both set: every server serves
  TLS only, and every client presents them as its client certificate. They may name the same file (a bundle of
  certificates and key, as a Nomad template renders it): the certificates and the key are picked out of it.
- ``CHIRON_TLS_CA``: PEM CA bundle. Set: servers require client certificates signed by it (mutual TLS) and clients
  verify servers with it (unset: servers take any client, clients trust the system roots).
- ``CHIRON_TLS_SERVER_NAME``: the name clients expect in server certificates, when it differs from the host they
  dial (e.g. every service's certificate carries ``chiron.service.consul`` while peers dial IP addresses).

Tokens are never logged: they are kept out of ``repr`` and validation errors, and refusals name neither the token
sent nor the tokens expected. Health checking and server reflection stay open (no token), so orchestrators can
probe a server; with mutual TLS on they still need a client certificate, like every other call.
"""

from __future__ import annotations

import functools
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import grpc
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger(__name__)

# Methods any caller may use without a token: orchestrator probes and tooling.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class SecuritySettings(BaseSettings):
    """Tokens and TLS files of one process; see the module docstring for the environment variables."""

    model_config = SettingsConfigDict(env_prefix="CHIRON_", hide_input_in_errors=True, extra="ignore")

    auth_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list, repr=False,
        description="Bearer tokens the client-facing APIs accept; empty = authentication off.")
    auth_tokens_file: Path | None = Field(None, description="File with more accepted tokens, one per line.")
    token: str | None = Field(None, repr=False, description="Token sent when this process calls the Router.")
    tls_cert: Path | None = Field(None, description="PEM certificate chain this process presents.")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    tls_ca: Path | None = Field(None, description="PEM CA bundle: verifies peers; on servers, turns on mutual TLS.")
    tls_server_name: str | None = Field(None, description="Name expected in server certificates, when not the host dialled.")

    @field_validator("auth_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> SecuritySettings:
        if self.auth_tokens_file is not None:
            try:
                lines = self.auth_tokens_file.read_text().splitlines()
            except OSError as e:
                raise ValueError(f"CHIRON_AUTH_TOKENS_FILE {self.auth_tokens_file}: cannot read it ({e.strerror})") from None
            self.auth_tokens = [*self.auth_tokens, *(t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#"))]
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("CHIRON_TLS_CERT and CHIRON_TLS_KEY go together: set both (TLS on) or neither (TLS off)")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path: Path | None = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"CHIRON_{name.upper()}={path}: no such file (create certificates with `chiron certs DIR`)")
        return self

    @property
    def auth_enabled(self) -> bool:
        """True when the client-facing APIs require a bearer token."""
        return bool(self.auth_tokens)

    @property
    def tls_enabled(self) -> bool:
        """True when this process has a certificate and key: its servers serve TLS, its clients present them."""
        return self.tls_cert is not None and self.tls_key is not None

    @property
    def secure_client(self) -> bool:
        """True when this process's gRPC channels use TLS (a certificate of its own, or a CA to verify servers)."""
        return self.tls_enabled or self.tls_ca is not None


@functools.cache
def security_settings() -> SecuritySettings:
    """This process's settings from the environment, read once. Raises pydantic.ValidationError with an actionable
    message (certificate without key, missing file) — never showing a token."""
    return SecuritySettings()


def reset_security_settings() -> None:
    """Forget the cached settings so the next :func:`security_settings` reads the environment again (tests)."""
    security_settings.cache_clear()


def token_ok(token: str | None, settings: SecuritySettings | None = None) -> bool:
    """Whether ``token`` is one of the accepted bearer tokens; always True when authentication is off.
    Compares in constant time against every accepted token."""
    s = settings or security_settings()
    if not s.auth_tokens:
        return True
    if not token:
        return False
    sent = token.encode()
    ok = False
    for accepted in s.auth_tokens:
        ok |= hmac.compare_digest(sent, accepted.encode())
    return ok


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (scheme case-insensitive); None when absent or
    not a bearer credential."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def auth_metadata(settings: SecuritySettings | None = None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata that authenticates this process to the Router: ``(("authorization", "Bearer <token>"),)``
    when ``CHIRON_TOKEN`` is set, else ``()``."""
    s = settings or security_settings()
    return (("authorization", f"Bearer {s.token}"),) if s.token else ()


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)


def _pem(path: Path, variable: str, key: bool) -> bytes:
    """The private key (``key``) or the certificates of the PEM file ``path``, which may hold both. Raises OSError
    when it cannot be read, ValueError when it holds no such block (naming the ``variable`` that points there)."""
    blocks = [m for m in _PEM_BLOCK.finditer(path.read_bytes()) if m.group(1).endswith(b"PRIVATE KEY") == key]
    if not blocks:
        raise ValueError(f"{variable}={path}: no PEM {'private key' if key else 'certificate'} in it")
    return blocks[0].group(0) if key else b"".join(m.group(0) for m in blocks)


def channel_credentials(settings: SecuritySettings | None = None) -> grpc.ChannelCredentials:
    """TLS channel credentials: the CA (if any) to verify servers, the certificate and key (if any) as the client
    certificate. Raises OSError when a PEM file cannot be read, ValueError when it holds no certificate / key."""
    s = settings or security_settings()
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(s.tls_ca, "CHIRON_TLS_CA", key=False) if s.tls_ca else None,
        private_key=_pem(s.tls_key, "CHIRON_TLS_KEY", key=True) if s.tls_key else None,
        certificate_chain=_pem(s.tls_cert, "CHIRON_TLS_CERT", key=False) if s.tls_cert else None)


def open_channel(address: str, *, options: Sequence[tuple[str, Any]] | None = None,
                 settings: SecuritySettings | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address`` ("host:port"): TLS when this process has a certificate or a CA configured,
    plaintext otherwise. Raises OSError / ValueError as :func:`channel_credentials`."""
    s = settings or security_settings()
    opts = list(options or ())
    if not s.secure_client:
        return grpc.aio.insecure_channel(address, options=opts)
    if s.tls_server_name:
        opts.append(("grpc.ssl_target_name_override", s.tls_server_name))
    return grpc.aio.secure_channel(address, channel_credentials(s), options=opts)


def server_credentials(settings: SecuritySettings | None = None) -> grpc.ServerCredentials | None:
    """TLS server credentials from the certificate and key, requiring client certificates signed by the CA when
    one is configured (mutual TLS); None when TLS is off. Raises ValueError for a CA without a certificate of
    its own or a PEM file without the certificate / key expected, OSError when a PEM file cannot be read."""
    s = settings or security_settings()
    if not s.tls_enabled:
        if s.tls_ca is not None:
            raise ValueError("CHIRON_TLS_CA is set but CHIRON_TLS_CERT / CHIRON_TLS_KEY are not: a server needs a "
                             "certificate of its own to serve TLS (see `chiron certs`)")
        return None
    assert s.tls_cert is not None and s.tls_key is not None
    ca = _pem(s.tls_ca, "CHIRON_TLS_CA", key=False) if s.tls_ca else None
    pair = (_pem(s.tls_key, "CHIRON_TLS_KEY", key=True), _pem(s.tls_cert, "CHIRON_TLS_CERT", key=False))
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def add_port(server: grpc.aio.Server, address: str, settings: SecuritySettings | None = None) -> int:
    """Bind ``server`` to ``address`` ("host:port"), with TLS when configured. Returns the bound port (0 when the
    address cannot be bound). Raises ValueError / OSError as :func:`server_credentials`."""
    creds = server_credentials(settings)
    return server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)


_MISSING = ("missing bearer token: send gRPC metadata 'authorization: Bearer <token>' with a token the server accepts "
            "(clients of chiron: set CHIRON_TOKEN; servers take theirs from CHIRON_AUTH_TOKENS)")
_WRONG = ("invalid bearer token: the token sent is not one the server accepts (CHIRON_AUTH_TOKENS on the server, "
          "CHIRON_TOKEN on chiron clients)")


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call that lacks an accepted bearer token with UNAUTHENTICATED, except health checking and
    reflection. Authentication off (no tokens): every call passes."""

    def __init__(self, settings: SecuritySettings | None = None) -> None:
        self._settings = settings or security_settings()

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if not self._settings.auth_enabled or method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(handler_call_details)
        sent = bearer_token(next((v for k, v in handler_call_details.invocation_metadata or ()
                                  if k == "authorization" and isinstance(v, str)), None))
        if token_ok(sent, self._settings):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: UNIMPLEMENTED, as without authentication
            return None
        return _refusing(handler, method, _WRONG if sent else _MISSING)


def _refusing(handler: grpc.RpcMethodHandler, method: str, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with UNAUTHENTICATED."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        log.warning("refused %s from %s: %s", method, context.peer(), message.split(":")[0])
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def write_dev_certificates(directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost", "::1"),
                           days: int = 30) -> dict[str, Path]:
    """Write a development CA and two certificates it signs into ``directory`` (created if needed), as PEM:

    - ``ca.pem`` / ``ca-key.pem``: the CA (keep the key out of deployments; it only signs);
    - ``server.pem`` / ``server-key.pem``: for the services, valid for ``hosts`` (IP addresses or DNS names, as
      subject alternative names) as server *and* client (services call one another);
    - ``client.pem`` / ``client-key.pem``: a client-only certificate for callers outside the cluster.

    ECDSA P-256 keys, ``days`` [days] of validity; private keys are written with mode 0600. Returns the paths by
    name (``ca``, ``ca_key``, ``server``, ``server_key``, ``client``, ``client_key``). Raises OSError when the
    directory cannot be written, ValueError for an empty ``hosts``."""
    import datetime
    import ipaddress
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("certificates need at least one host name or IP address")
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    out: dict[str, Path] = {}

    def save(name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        out[name], out[f"{name}_key"] = path, key_path

    def subject(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Chiron development"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def builder(name: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name).issuer_name(issuer).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days)))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = subject(f"Chiron development CA {now:%Y-%m-%d %H:%M:%S}")
    ca_cert = (builder(ca_name, ca_key, ca_name)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    save("ca", ca_key, ca_cert)

    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    for name, usages in (("server", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                         ("client", [ExtendedKeyUsageOID.CLIENT_AUTH])):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (builder(subject(f"chiron-{name}"), key, ca_cert.subject)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if name == "server":
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        save(name, key, b.sign(ca_key, hashes.SHA256()))
    return out
