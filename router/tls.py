"""TLS for both listeners (``--tls-cert FILE --tls-key FILE``), with the standard library's
:mod:`ssl`: TLS 1.2 and later only, the certificate chain and key read at start and again
on SIGHUP (a renewed certificate is used by the next handshakes; open connections keep
theirs).

A client that speaks plaintext to a TLS port fails its handshake: asyncio closes that
connection and (outside its debug mode) logs nothing, so it costs nobody else anything; a
handshake that does not finish in ``--tls-handshake-timeout`` seconds is closed the same
way."""

from __future__ import annotations

import logging
import ssl
from typing import Optional

log = logging.getLogger(__name__)


class TlsError(Exception):
    """The certificate or key cannot be used; the message is one line for the operator."""


def server_context(cert: str, key: Optional[str]) -> ssl.SSLContext:
    """A server context for *cert* (a PEM chain) and *key* (its PEM private key; None: in
    *cert*). Raises :class:`TlsError`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_chain(context, cert, key)
    return context


def load_chain(context: ssl.SSLContext, cert: str, key: Optional[str]) -> None:
    """(Re)load the certificate chain and key into *context*. Raises :class:`TlsError`."""
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as error:
        raise TlsError(f"TLS: {error.filename or cert}: no such file") from error
    except PermissionError as error:
        raise TlsError(f"TLS: {error.filename or cert}: permission denied") from error
    except (ssl.SSLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or str(error)
        raise TlsError(
            f"TLS: cannot use certificate {cert} with key {key or cert} ({reason}): both must "
            "be PEM files, the key the certificate's own"
        ) from error


def listener_options(context: Optional[ssl.SSLContext], handshake_timeout: float) -> dict:
    """The ``loop.create_server`` keywords of a listener that speaks TLS with *context*
    (plaintext when None)."""
    if context is None:
        return {}
    return {"ssl": context, "ssl_handshake_timeout": handshake_timeout}


def reload(context: ssl.SSLContext, cert: str, key: Optional[str]) -> None:
    """SIGHUP: load the files again; on failure keep what was loaded, and say so. They are
    tried on a fresh context first: loading into the live one is not atomic (a certificate
    that loads with a key that does not would leave it with neither)."""
    try:
        load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key)
        load_chain(context, cert, key)
    except TlsError as error:
        log.error("%s; still using the certificate loaded before", error)
        return
    log.info("TLS certificate reloaded from %s", cert)
