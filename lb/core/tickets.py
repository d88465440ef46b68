"""TLS session ticket keys shared by every worker, rotated by the clock.

A client resumes its session with a ticket it got on an earlier connection;
with SO_REUSEPORT the next connection lands on any worker, so every worker
must read every worker's tickets.  The supervisor draws one secret when it
starts (kept across reloads, never written anywhere) and gives it to each
worker in its environment.  Each worker derives the key of the current
period from it, `period = floor(unix time / ticket_rotation)`: workers agree
without talking, new tickets are sealed with the current key, and tickets
sealed with the previous period's key are still accepted (and renewed).

The standard library has no API for ticket keys, so the key callback is
installed on the SSL_CTX with ctypes, from the same OpenSSL the `ssl` module
uses (looked up through the `_ssl` extension).  If anything about that does
not hold (another OpenSSL, an unexpected object layout), `install` says so
and each worker keeps OpenSSL's own random keys: resumption then works only
on the worker that issued the ticket.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import ssl
import time

from lb.core.log import log

SECRET_ENV = "LB_TLS_TICKET_SECRET"
_NAME, _KEY = 16, 32
_OSSL_PARAM_UTF8_STRING = 4
_OSSL_PARAM_OCTET_STRING = 5
_UNMODIFIED = ctypes.c_size_t(-1).value


class _Param(ctypes.Structure):
    _fields_ = [("key", ctypes.c_char_p), ("data_type", ctypes.c_uint), ("data", ctypes.c_void_p),
                ("data_size", ctypes.c_size_t), ("return_size", ctypes.c_size_t)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)


def _libssl():
    import _ssl

    lib = ctypes.CDLL(getattr(_ssl, "__file__", None))  # dlsym searches its libssl/libcrypto too
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_set_tlsext_ticket_key_evp_cb.argtypes = [ctypes.c_void_p, _CALLBACK]
    lib.EVP_aes_256_cbc.restype = ctypes.c_void_p
    lib.EVP_EncryptInit_ex.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_char_p, ctypes.c_void_p]
    lib.EVP_DecryptInit_ex.argtypes = lib.EVP_EncryptInit_ex.argtypes
    lib.EVP_MAC_CTX_set_params.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    return lib


def _ssl_ctx_pointer(ctx: ssl.SSLContext, lib) -> int | None:
    """The SSL_CTX* of a Python SSLContext: the first field after the object
    header.  Checked by reading the options through it."""
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr or lib.SSL_CTX_get_options(ptr) != int(ctx.options):
        return None
    return ptr


class TicketKeys:
    """The key callback for the contexts of one worker's listener."""

    def __init__(self, secret: bytes, rotation: float, clock=time.time) -> None:
        self.secret = secret
        self.rotation = rotation
        self.clock = clock
        self.keys: dict[int, tuple[bytes, bytes, bytes]] = {}
        self.lib = None
        self.callback = _CALLBACK(self._on_ticket)  # kept referenced: OpenSSL holds the pointer
        self.installed = 0
        self.failed = ""

    @classmethod
    def from_env(cls, rotation: float) -> "TicketKeys":
        raw = os.environ.get(SECRET_ENV, "")
        try:
            secret = bytes.fromhex(raw)
        except ValueError:
            secret = b""
        if len(secret) < 32:
            secret = os.urandom(32)  # started alone: tickets resume on this process only
        return cls(secret, rotation)

    def key(self, period: int) -> tuple[bytes, bytes, bytes]:
        """(name, hmac key, aes key) of a period."""
        k = self.keys.get(period)
        if k is None:
            material = hmac.new(self.secret, b"lb ticket key %d" % period, hashlib.sha512).digest()
            name = hashlib.sha256(material).digest()[:_NAME]
            k = (name, material[:_KEY], material[_KEY:])
            if len(self.keys) > 4:
                self.keys.clear()
            self.keys[period] = k
        return k

    def install(self, ctx: ssl.SSLContext) -> bool:
        try:
            if self.lib is None:
                self.lib = _libssl()
            ptr = _ssl_ctx_pointer(ctx, self.lib)
            if ptr is None:
                raise OSError("unexpected SSLContext layout")
            if self.lib.SSL_CTX_set_tlsext_ticket_key_evp_cb(ptr, self.callback) != 1:
                raise OSError("SSL_CTX_set_tlsext_ticket_key_evp_cb failed")
        except (OSError, AttributeError, TypeError) as exc:
            if not self.failed:
                self.failed = str(exc)
                log("tls_ticket_keys_local", error=self.failed,
                    effect="sessions resume only on the worker that issued the ticket")
            return False
        self.installed += 1
        return True

    def _on_ticket(self, _ssl, key_name, iv, cipher_ctx, mac_ctx, enc) -> int:
        try:
            lib = self.lib
            period = int(self.clock() // self.rotation)
            if enc:
                name, mac_key, aes_key = self.key(period)
                ctypes.memmove(key_name, name, _NAME)
                ctypes.memmove(iv, os.urandom(16), 16)
                if lib.EVP_EncryptInit_ex(cipher_ctx, lib.EVP_aes_256_cbc(), None, aes_key, iv) != 1:
                    return 0
                return 1 if self._set_mac(mac_ctx, mac_key) else 0
            wanted = ctypes.string_at(key_name, _NAME)
            for age in (0, 1):
                name, mac_key, aes_key = self.key(period - age)
                if hmac.compare_digest(name, wanted):
                    if lib.EVP_DecryptInit_ex(cipher_ctx, lib.EVP_aes_256_cbc(), None, aes_key, iv) != 1:
                        return 0
                    if not self._set_mac(mac_ctx, mac_key):
                        return 0
                    return 1 if age == 0 else 2  # 2: accepted, and a new ticket is issued
            return 0  # unknown or too old: a full handshake
        except Exception:  # noqa: BLE001 - must not unwind through OpenSSL
            return 0  # no ticket issued / a full handshake

    def _set_mac(self, mac_ctx, mac_key: bytes) -> bool:
        key = ctypes.create_string_buffer(mac_key, len(mac_key))
        digest = ctypes.create_string_buffer(b"SHA256")
        params = (_Param * 3)(
            _Param(b"key", _OSSL_PARAM_OCTET_STRING, ctypes.cast(key, ctypes.c_void_p), len(mac_key), _UNMODIFIED),
            _Param(b"digest", _OSSL_PARAM_UTF8_STRING, ctypes.cast(digest, ctypes.c_void_p), 6, _UNMODIFIED),
            _Param(None, 0, None, 0, 0),
        )
        return self.lib.EVP_MAC_CTX_set_params(mac_ctx, params) == 1
