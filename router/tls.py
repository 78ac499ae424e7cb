"""TLS contexts for DICOM associations, inbound (we are the server) and outbound."""

from __future__ import annotations

import ssl

from router.config import Tls


def server_context(tls: Tls) -> ssl.SSLContext:
    """A context for the listening socket; requires a client certificate when configured."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca) if tls.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert is None or tls.key is None:
        raise ValueError("[listen.tls] needs cert and key")
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_peer_cert else ssl.CERT_OPTIONAL if tls.ca else ssl.CERT_NONE
    return ctx


def client_context(tls: Tls) -> ssl.SSLContext:
    """A context for associations to a destination; verifies its certificate against `ca`."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = tls.verify_hostname
    if not tls.require_peer_cert:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert is not None and tls.key is not None:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx
