"""Byte counts as people write and read them: the one parser and the one formatter.

Every size nbdrep takes (``--keepaside-mem 256M``, ``verify --chunk 4MiB``) goes through
``parse_size`` and every size it prints through ``format_size``. Units are powers of 1024, as
nbdkit's own sizes are: ``K``, ``M``, ``G``, ``T``, ``P``, optionally spelled ``KiB``... A
decimal ``MB`` is refused rather than guessed at.
"""
import argparse
import re

_SHIFTS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}
_SIZE = re.compile(r"(\d+)\s*(?:([kmgtp])(?:ib)?|b)?", re.IGNORECASE)
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
EXAMPLES = "e.g. 4096, 512K, 64M, 1G"


def parse_size(text):
    """'64M' -> 67108864: a whole number of bytes, optionally with a binary unit (K, M, G, T, P,
    or KiB, MiB, ...; case-insensitive; a trailing B alone means bytes). Raises ValueError
    naming the text otherwise. O(len(text))."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size ({EXAMPLES})")
    return int(m[1]) << _SHIFTS[(m[2] or "").lower()]


def format_size(n):
    """67108864 -> '64.0 MiB'; below 1 KiB in bytes ('512 B'). O(1)."""
    exponent = min(len(_UNITS) - 1, max(0, (int(n).bit_length() - 1) // 10))
    if exponent == 0:
        return f"{n} B"
    return f"{n / (1 << 10 * exponent):.1f} {_UNITS[exponent]}"


def size_argument(text):
    """``parse_size`` as an argparse ``type``: its message becomes the usage error."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
