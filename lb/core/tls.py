"""TLS: certificates checked, the listener's contexts, the backends' contexts.

Certificates and keys are read by `check` (lb check, start, reload: a bad or
mismatched pair is a ConfigError naming the file and the field) and by
`server_context` in each worker, which builds one SSLContext per certificate
and picks among them by SNI (exact names, then one-label wildcards; the first
certificate when nothing matches).  Handshakes are counted, by outcome, by
the SSL object class the listener's context makes (`CountingSSLObject`): a
failed handshake never reaches the HTTP protocol, so nothing else sees it.

Parsing certificates uses the `cryptography` package (names, expiry, key
type); the handshakes themselves are the standard library's OpenSSL.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from lb.core.config import Config, ConfigError

EXPIRY_WARN = 14 * 86400  # seconds: `lb check` warns when a certificate expires sooner
MAX_REASONS = 32  # distinct handshake failure reasons counted by name; the rest are "other"


@dataclass
class CertInfo:
    path: str
    names: list[str]  # DNS names it serves (its subjectAltNames, or its CN without any)
    not_after: float  # Unix time
    key_type: str  # "ecdsa-p256", "rsa-2048", ...
    subject: str = ""

    def expires_in(self, now: float | None = None) -> float:
        return self.not_after - (time.time() if now is None else now)


def _read(path: str, where: str, cfg_path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(cfg_path, where, f"cannot read {path}: {exc.strerror or exc}") from None


def _key_type(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384"}.get(key.curve.name, "ecdsa")
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    return type(key).__name__


def inspect(cert_path: str, key_path: str, where: str, cfg_path: str = "<config>") -> CertInfo:
    """Read a certificate and its key: `where` is the config field ("tls.certificates[0]")."""
    data = _read(cert_path, f"{where}.cert", cfg_path)
    if key_path:
        _read(key_path, f"{where}.key", cfg_path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(cfg_path, f"{where}.cert", f"{cert_path}: not a PEM certificate") from None
    leaf = certs[0]
    try:
        names, not_after, key_type = _describe(leaf)
        subject = leaf.subject.rfc4514_string()
    except Exception as exc:  # noqa: BLE001 - any parse error of an odd certificate is the file's
        raise ConfigError(cfg_path, f"{where}.cert",
                          f"{cert_path}: cannot read the certificate ({type(exc).__name__}: {exc})") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        load_pair(ctx, cert_path, key_path)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            msg = f"{key_path or cert_path}: the key does not match the certificate {cert_path}"
        else:
            msg = f"{key_path or cert_path}: not a usable private key ({exc.reason or exc})"
        raise ConfigError(cfg_path, f"{where}.key", msg) from None
    except EncryptedKey:
        raise ConfigError(cfg_path, f"{where}.key", f"{key_path or cert_path}: the private key is "
                          "encrypted (lb reads unencrypted keys only: decrypt it, and keep it readable "
                          "by lb's user only)") from None
    except OSError as exc:
        raise ConfigError(cfg_path, f"{where}.key", f"{key_path}: {exc.strerror or exc}") from None
    return CertInfo(cert_path, names, not_after, key_type, subject)


def _describe(leaf: x509.Certificate) -> tuple[list[str], float, str]:
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower() for n in sans.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [a.value.lower() for a in leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
                 if isinstance(a.value, str)]
    return names, leaf.not_valid_after_utc.timestamp(), _key_type(leaf)


class EncryptedKey(Exception):
    """A private key that needs a passphrase: never prompted for (no terminal to ask on)."""


def _no_passphrase():
    raise EncryptedKey


def load_pair(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    """ctx.load_cert_chain, never prompting for a passphrase (EncryptedKey instead)."""
    ctx.load_cert_chain(cert, key or None, password=_no_passphrase)


def check(cfg: Config, cfg_path: str = "<config>", now: float | None = None) -> list[CertInfo]:
    """Every certificate of the TLS listener and the upstream client certificate,
    read and matched with its key; expired ones are errors.  The caller warns
    about the ones that expire within EXPIRY_WARN."""
    now = time.time() if now is None else now
    infos = []
    for i, c in enumerate(cfg.tls.certificates):
        info = inspect(c.cert, c.key, f"tls.certificates[{i}]", cfg_path)
        if info.not_after <= now:
            raise ConfigError(cfg_path, f"tls.certificates[{i}].cert",
                              f"{c.cert}: expired on {time.strftime('%Y-%m-%d', time.gmtime(info.not_after))}")
        infos.append(info)
    up = cfg.upstream
    if up.tls_cert:
        info = inspect(up.tls_cert, up.tls_key, "upstream.tls_cert", cfg_path)
        infos.append(info)
    if up.tls_ca:
        data = _read(up.tls_ca, "upstream.tls_ca", cfg_path)
        try:
            ssl.create_default_context(cadata=data.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError):
            raise ConfigError(cfg_path, "upstream.tls_ca", f"{up.tls_ca}: no PEM certificate in it") from None
    if cfg.tls.listen:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(cfg.tls.ciphers)
        except ssl.SSLError:
            raise ConfigError(cfg_path, "tls.ciphers", f"{cfg.tls.ciphers!r}: no cipher OpenSSL knows") from None
    return infos


# -- handshakes -------------------------------------------------------------


@dataclass
class Handshakes:
    """One process's TLS handshakes on the listener: completed, and failed by reason."""

    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    timeout: float = 10.0

    def fail(self, reason: str) -> None:
        f = self.failed
        if reason not in f and len(f) >= MAX_REASONS:
            reason = "other"
        f[reason] = f.get(reason, 0) + 1


HANDSHAKES = Handshakes()


class CountingSSLObject(ssl.SSLObject):
    """The listener's SSL objects: each counts how its handshake ended.
    Only the handshake is overridden; reads and writes are the standard ones."""

    _lb_t0 = 0.0
    _lb_done = False

    @classmethod
    def _create(cls, *args, **kwargs):
        self = super()._create(*args, **kwargs)
        self._lb_t0 = time.monotonic()
        return self

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            self._lb_done = True
            HANDSHAKES.fail((exc.reason or type(exc).__name__).lower())
            raise
        self._lb_done = True
        HANDSHAKES.ok += 1

    def __del__(self) -> None:
        if not self._lb_done:
            # Never finished nor failed in OpenSSL: the client went away (closed
            # or reset), or stalled until the handshake timeout closed it.
            late = time.monotonic() - self._lb_t0 >= HANDSHAKES.timeout * 0.99
            HANDSHAKES.fail("timeout" if late else "client_closed")


def _base_server_context(tls, cert) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(tls.ciphers)
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
                    | ssl.OP_NO_RENEGOTIATION | ssl.OP_SINGLE_ECDH_USE)
    if not tls.session_tickets:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    ctx.set_alpn_protocols(["http/1.1"])
    load_pair(ctx, cert.cert, cert.key)
    ctx.sslobject_class = CountingSSLObject
    return ctx


def server_context(cfg: Config, ticket_keys=None) -> ssl.SSLContext:
    """The listener's context (the first certificate's), switching to another
    certificate's context when the client's SNI names one of its names."""
    tls = cfg.tls
    HANDSHAKES.timeout = tls.handshake_timeout
    contexts = []
    exact: dict[str, ssl.SSLContext] = {}
    wild: dict[str, ssl.SSLContext] = {}
    for i, c in enumerate(tls.certificates):
        ctx = _base_server_context(tls, c)
        contexts.append(ctx)
        names = c.names or inspect(c.cert, c.key, f"tls.certificates[{i}]").names
        for n in names:
            n = n.lower()
            if n.startswith("*."):
                wild.setdefault(n[2:], ctx)
            else:
                exact.setdefault(n, ctx)
    if ticket_keys is not None:
        for ctx in contexts:
            if ticket_keys.install(ctx):
                ctx.lb_ticket_keys = ticket_keys  # OpenSSL holds its callback: keep it alive
    default = contexts[0]
    if len(contexts) > 1:
        def pick(sslobj, server_name, _ctx) -> None:
            if server_name:
                name = server_name.lower()
                chosen = exact.get(name) or wild.get(name.partition(".")[2])
                if chosen is not None and chosen is not default:
                    sslobj.context = chosen
            return None

        default.sni_callback = pick
    return default


def client_context(cfg: Config) -> ssl.SSLContext:
    """For backends with `tls = true`: the system's CAs (or `upstream.tls_ca`),
    name checked against the backend's `sni` (or its host), TLS 1.2 or newer."""
    up = cfg.upstream
    ctx = ssl.create_default_context(cafile=up.tls_ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not up.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if up.tls_cert:
        load_pair(ctx, up.tls_cert, up.tls_key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def describe(exc: BaseException) -> str:
    """One line for a failed TLS connect to a backend (logs)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {(exc.reason or str(exc)).lower()}"
    return str(exc) or type(exc).__name__
