"""Runs a dynamo_lite process as the next wire version would write: every message gains one more optional field
at the end (which this version's readers ignore, and which its own reader, missing, fills with the default).

    python -m tests.e2e.next_wire dynamo_lite.worker --mode decode ...
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

import msgspec

from dynamo_lite import protocol

NEXT_FIELD = "a field of the next wire version"
_encode = protocol.encode


def encode_next(msg: msgspec.Struct) -> bytes:
    fields: Any = msgspec.msgpack.decode(_encode(msg))
    return msgspec.msgpack.encode([*fields, NEXT_FIELD])


def main() -> None:
    # Before any other dynamo_lite module imports ``encode`` by name: they all get this one.
    protocol.encode = encode_next  # type: ignore[assignment]
    print(f"NEXT WIRE: every message carries {NEXT_FIELD!r}", flush=True)
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
