"""Text that came from the network, made safe to show a person: one place for every CLI table,
console log line and message that may carry a UID, an AE title or a peer's error text.

A value may hold control characters (a forged second line, a live ANSI escape), invisible
format characters (right-to-left overrides) or separators a terminal does not print as
themselves. `escape` writes each such character as Python's repr would (`\\n`, `\\x1b`,
`\\u202e`) and leaves everything else, spaces and backslashes included, as it is: escaping twice
changes nothing, so a message built from escaped values can be escaped again. `field` is for
`key=value` lines, where a value with a space or a quote would look like two fields.
Imports nothing of the router.
"""

from __future__ import annotations


def escape(value: object) -> str:
    """`value` as text a terminal shows as it is: every character that is not printable
    (`str.isprintable`) written repr-style, the rest unchanged."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def field(value: object) -> str:
    """`value` for a `key=value` line: escaped, and in quotes (repr-style) when it is empty or
    holds whitespace, a quote or an equals sign, so that the line keeps one value per key."""
    text = escape(value)
    if text and not any(ch.isspace() or ch in "'\"=" for ch in text):
        return text
    return "'" + text.replace("'", "\\'") + "'"
