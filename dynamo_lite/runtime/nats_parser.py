"""nats-py's protocol parser with a fast path for MSG, the one operation a token stream brings per token.

nats-py's ``Parser`` matches a regular expression per control line and deletes each message from the front of
its buffer (a copy of everything after it, per message). This one reads plain MSG lines and their payloads at an
offset and trims the buffer once per read; everything else (HMSG, PING, PONG, INFO, +OK, -ERR) goes to nats-py's
own code from where the fast path stopped, with the same state fields, so either can continue the other.
"""

from __future__ import annotations

from nats.errors import ProtocolError
from nats.protocol.parser import AWAITING_CONTROL_LINE, AWAITING_MSG_PAYLOAD, Parser

_MSG = b"MSG "
_CRLF = b"\r\n"
_MAX_CONTROL_LINE = 4096


class FastParser(Parser):
    """``Parser`` with MSG parsed at an offset (see the module docstring). It takes over a ``Parser`` in place
    (``nats_fast_path.FastPaths``); ``fast_messages`` counts the messages it read itself."""

    fast_messages = 0

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        pos = 0
        process_msg = self.nc._process_msg
        try:
            while True:
                if self.state == AWAITING_CONTROL_LINE:
                    if not buf.startswith(_MSG, pos):
                        break  # not a MSG (or not all of it yet): nats-py's parser takes it from here
                    end = buf.find(_CRLF, pos, pos + _MAX_CONTROL_LINE)
                    if end < 0:
                        break
                    parts = bytes(buf[pos + 4 : end]).split()
                    if len(parts) == 3:
                        subject, sid, size = parts
                        reply = b""
                    elif len(parts) == 4:
                        subject, sid, reply, size = parts
                    else:
                        raise ProtocolError("nats: malformed MSG")
                    self.msg_arg["subject"] = subject
                    self.msg_arg["sid"] = int(sid)
                    self.msg_arg["reply"] = reply
                    self.needed = int(size)
                    self.header_needed = 0
                    self.state = AWAITING_MSG_PAYLOAD
                    pos = end + 2
                elif self.header_needed:
                    break  # an HMSG's payload: nats-py's
                else:
                    needed = self.needed
                    if len(buf) - pos < needed + 2:
                        break
                    payload = bytes(buf[pos : pos + needed])
                    pos += needed + 2
                    self.state = AWAITING_CONTROL_LINE
                    arg = self.msg_arg
                    self.fast_messages += 1
                    await process_msg(arg["sid"], arg["subject"], arg["reply"], payload, None)
        finally:
            if pos:
                del buf[:pos]
        if buf:
            await super().parse()
