"""TLS for every client of the process: one way to build a context, one way to name a failure.

Every context requires TLS 1.2 or newer (1.3 where the server offers it) and verifies the
server's certificate: against the configured CA bundle, or the system's trusted CAs when none
is set. Verification can only be weakened by PostgreSQL's explicit sslmode (require checks
nothing, verify-ca not the name), never by omission.
"""

from __future__ import annotations

import ssl

from cdc_sink.config import ConfigError

__all__ = ["client_context", "is_untrusted_certificate", "untrusted_hint"]


def client_context(
    setting: str,
    cafile: str | None,
    certfile: str | None = None,
    keyfile: str | None = None,
    *,
    check_hostname: bool = True,
    verify: bool = True,
) -> ssl.SSLContext:
    """A client context trusting `cafile` (PEM; None: the system's CAs), presenting `certfile`
    and `keyfile` if given. `setting` is the CA setting's prefix (e.g. CDC_KAFKA__SSL), named
    in the ConfigError raised for a file that is not a usable certificate or key."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if cafile is not None:
            context.load_verify_locations(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{setting}: cannot load the CA bundle {cafile!r}: {exc}") from None
    try:
        if certfile is not None:
            context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{setting}: cannot load the client certificate {certfile!r} and key {keyfile!r}: {exc}"
        ) from None
    context.check_hostname = check_hostname and verify
    if not verify:
        context.verify_mode = ssl.CERT_NONE
    return context


def is_untrusted_certificate(exc: BaseException | None) -> bool:
    """`exc`, or an error it was raised from, is a failed certificate verification."""
    seen = 0
    while exc is not None and seen < 10:
        # requests (under hvac) keeps the SSL error in its arguments, not as a cause: there
        # only OpenSSL's reason in the message tells
        if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def untrusted_hint(service: str, cafile_setting: str, cafile: str | None) -> str:
    """The sentence that tells an operator which setting to look at after `service`'s
    certificate was refused."""
    trusted = f"the CA bundle {cafile!r}" if cafile else "the system's trusted CAs"
    return (
        f"{service}'s certificate is not trusted by {trusted} ({cafile_setting}), or does not "
        "name the host it was reached at"
    )
