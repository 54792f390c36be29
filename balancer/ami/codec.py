"""The AMI wire format: an incremental message reader and an encoder, shared by client and sim.

Messages are ``Key: Value`` lines ending in CRLF; a blank line ends a message. Two quirks shape
the reader: a key may repeat (Asterisk 22 ``Output:`` lines, ``Variable:``), and Asterisk 1.4-13
answers ``Command`` with ``Response: Follows`` and raw text that may hold bare LFs and blank lines,
ended by ``--END COMMAND--``. Bytes are decoded only once a message is complete, so a multibyte
character split across reads survives (panoramisk decodes per chunk and loses it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from balancer.errors import AmiProtocolError

__all__ = ["BANNER_PREFIX", "END_COMMAND", "Message", "MessageReader", "encode"]

Message = dict[str, str]

BANNER_PREFIX = "Asterisk Call Manager/"
END_COMMAND = "--END COMMAND--"

_TERMINATOR = b"\r\n\r\n"
_FOLLOWS = b"Response: Follows\r\n"
_END_COMMAND = END_COMMAND.encode()
# The slack when judging an unterminated buffer: it may already hold the first bytes of the
# terminator, and the verdict must not depend on how the bytes were split into reads.
_SLACK = len(_TERMINATOR) - 1
_LEGACY_SLACK = len(_END_COMMAND) + len(_TERMINATOR) - 1


class MessageReader:
    """Incremental AMI parser: feed it bytes as they arrive, get back every complete message."""

    __slots__ = ("_banner", "_buf", "_failed", "_max", "_need_banner", "_required", "_scan")

    def __init__(
        self,
        *,
        max_message_bytes: int = 65536,
        expect_banner: bool = True,
        required_keys: tuple[str, ...] = ("Event", "Response"),
    ) -> None:
        """Set the size guard, whether a banner line comes first, and the keys a message needs."""
        if max_message_bytes < 64:
            raise ValueError(f"max_message_bytes must be at least 64, got {max_message_bytes}")
        self._buf = bytearray()
        self._scan = 0  # where the terminator search resumes (bytes before it were searched)
        self._max = max_message_bytes
        self._need_banner = expect_banner
        self._banner: str | None = None
        self._required = tuple(required_keys)
        self._failed: str | None = None

    @property
    def banner(self) -> str | None:
        """The banner line (``Asterisk Call Manager/11.0.0``) once received."""
        return self._banner

    @property
    def version(self) -> str | None:
        """The AMI protocol version from the banner (``11.0.0``), once received."""
        if self._banner is None:
            return None
        return self._banner.partition("/")[2].strip() or None

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        """Add received bytes; return the messages they complete (AmiProtocolError on garbage)."""
        if self._failed is not None:
            raise AmiProtocolError(f"AMI reader unusable after an earlier error: {self._failed}")
        buf = self._buf
        buf += data
        out: list[Message] = []
        pos = 0
        try:
            if self._need_banner and not self._read_banner():
                return out
            n = len(buf)
            limit = self._max
            parse = self._parse
            while pos < n:
                if buf.startswith(_FOLLOWS, pos):
                    end = self._legacy(pos, n, out)
                    if end < 0:
                        break
                    pos = end
                    self._scan = pos
                    continue
                idx = buf.find(_TERMINATOR, self._scan if self._scan > pos else pos)
                if idx < 0:
                    if n - pos > limit + _SLACK:
                        self._fail(f"message over {limit} bytes without terminator")
                    self._scan = n - _SLACK if n - _SLACK > pos else pos
                    break
                if idx - pos > limit:
                    self._fail(f"message of {idx - pos} bytes is over the limit of {limit}")
                msg = parse(buf[pos:idx])
                if msg is not None:
                    out.append(msg)
                pos = idx + 4
        finally:
            if pos:
                del buf[:pos]
                self._scan = self._scan - pos if self._scan > pos else 0
        return out

    def _fail(self, reason: str) -> None:
        self._failed = reason
        self._buf.clear()
        raise AmiProtocolError(f"AMI protocol error: {reason}")

    def _read_banner(self) -> bool:
        buf = self._buf
        idx = buf.find(b"\n")
        if idx < 0:
            if len(buf) > self._max:
                self._fail(f"banner line over {self._max} bytes")
            return False
        line = bytes(buf[:idx]).rstrip(b"\r").decode("utf-8", "replace")
        del buf[: idx + 1]
        if "Call Manager/" not in line:
            self._fail(f"expected the banner '{BANNER_PREFIX}<version>', got {line[:80]!r}")
        self._banner = line
        self._need_banner = False
        return True

    def _parse(self, block: bytes | bytearray) -> Message | None:
        msg: Message = {}
        for line in block.decode("utf-8", "replace").split("\r\n"):
            key, sep, value = line.partition(": ")
            if not sep:
                if not line.endswith(":"):
                    continue  # not a header line: ignored, as Asterisk does
                key, value = line[:-1], ""
            if not key:
                continue
            old = msg.get(key)
            msg[key] = value if old is None else f"{old}\n{value}"
        if not msg and not block.strip():
            return None  # a stray blank line between messages
        for key in self._required:
            if key in msg:
                return msg
        if not self._required:
            return msg
        first = bytes(block[:60]).split(b"\r\n", 1)[0]
        wanted = "/".join(self._required)
        self._fail(f"not an AMI message: no {wanted} key (starts {first!r})")
        return None  # unreachable: _fail raises

    def _legacy(self, pos: int, n: int, out: list[Message]) -> int:
        """Parse a ``Response: Follows`` reply at ``pos``; returns its end, or -1 if incomplete."""
        buf = self._buf
        marker = buf.find(_END_COMMAND, pos)
        term = -1 if marker < 0 else buf.find(_TERMINATOR, marker + len(_END_COMMAND))
        if term < 0:
            if n - pos > self._max + _LEGACY_SLACK:
                self._fail(f"Command output over {self._max} bytes without {END_COMMAND}")
            return -1
        if term - pos > self._max:
            self._fail(f"Command output of {term - pos} bytes is over the limit of {self._max}")
        lines = buf[pos:marker].decode("utf-8", "replace").split("\n")
        msg: Message = {}
        i = 0
        # Headers (Response, Privilege, ActionID) end in CRLF; the raw CLI output ends in bare LF.
        while i < len(lines):
            line = lines[i]
            key, sep, value = line.partition(": ")
            if not (line.endswith("\r") and sep and key and " " not in key):
                break
            msg[key] = value[:-1]
            i += 1
        body = [line.rstrip("\r") for line in lines[i:]]
        while body and not body[-1]:
            body.pop()
        old = msg.get("Output")
        text = "\n".join(body)
        msg["Output"] = text if old is None else f"{old}\n{text}"
        out.append(msg)
        return term + len(_TERMINATOR)


def encode(headers: Mapping[str, str | Sequence[str]] | Sequence[tuple[str, str]]) -> bytes:
    """Render one AMI message; a list value repeats the key; CR/LF anywhere is a ValueError."""
    items: Iterable[tuple[str, str | Sequence[str]]]
    items = headers.items() if isinstance(headers, Mapping) else headers
    parts: list[str] = []
    for key, value in items:
        if not isinstance(key, str) or not key or ":" in key or "\r" in key or "\n" in key:
            raise ValueError(f"invalid AMI header name {key!r}")
        values: Sequence[str] = (value,) if isinstance(value, str) else value
        for item in values:
            if not isinstance(item, str):
                raise TypeError(f"AMI header {key!r}: value {item!r} is not a string")
            if "\r" in item or "\n" in item:
                raise ValueError(f"AMI header {key!r}: value contains CR or LF (header injection)")
            parts.append(f"{key}: {item}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("utf-8")
