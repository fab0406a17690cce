"""The gateway's TLS context: built once at start-up, shared by every connection.

Lesson from the field: a server that rebuilt its context per connection logged a TLS
line per client and could only be silenced by turning TLS off. Here one
`ssl.SSLContext` serves all handshakes, nothing is logged per handshake, and
`reload()` swaps in renewed certificates for new handshakes without a restart.
"""

from __future__ import annotations

import logging
import ssl

log = logging.getLogger(__name__)


class TLSContext:
    """Owns the one server-side `ssl.SSLContext` of a gateway process."""

    def __init__(self, certfile: str, keyfile: str | None = None) -> None:
        self.certfile = certfile
        self.keyfile = keyfile
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["http/1.1"])
        self._load()
        log.info("TLS enabled with certificate %s", certfile)

    def _load(self) -> None:
        try:
            self.context.load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"cannot load TLS certificate {self.certfile!r} / key {self.keyfile!r}: {exc}"
            ) from exc

    def reload(self) -> None:
        """Re-read certificate and key into the same context (new handshakes use them)."""
        self._load()
        log.info("TLS certificate reloaded from %s", self.certfile)
