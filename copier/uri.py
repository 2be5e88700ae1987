"""NBD URIs and errno text, without libnbd: importable where only a URI needs checking.

``nbd_plugin/params.py`` checks every ``replica=`` before anything starts; importing libnbd's
Python module for that would load it into every process that parses parameters.
"""

import errno as errno_module
import os
from urllib.parse import parse_qs, urlsplit

SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")


def parse_uri(uri):
    """Return `uri` if it is an NBD URI libnbd can connect to, else raise ValueError.

    Accepts nbd://, nbds://, nbd+unix:// and nbds+unix://; a unix URI must
    name its socket (``?socket=PATH``), a TCP URI its host.  O(len(uri)).
    """
    if not isinstance(uri, str):
        raise ValueError(f"bad NBD URI {uri!r}: must be a string")
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        raise ValueError(
            f"bad NBD URI {uri!r}: must be nbd://HOST[:PORT]/[EXPORT] or "
            "nbd+unix:///[EXPORT]?socket=PATH (or nbds:// / nbds+unix:// for TLS)")
    if parts.scheme.endswith("+unix") and not parse_qs(parts.query).get("socket"):
        raise ValueError(f"bad NBD URI {uri!r}: a unix URI needs ?socket=PATH")
    if not parts.scheme.endswith("+unix") and not parts.hostname:
        raise ValueError(f"bad NBD URI {uri!r}: a TCP URI needs a host")
    return uri


def describe_error(err):
    """Return 'NAME (message)' for an errno int (or 'unknown error'). O(1)."""
    if not err:
        return "unknown error"
    name = errno_module.errorcode.get(err, str(err))
    return f"{name} ({os.strerror(err)})"
