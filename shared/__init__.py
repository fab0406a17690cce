"""Code shared by the streamscribe gateway, worker, client SDK and command line."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
