"""Print the result lines of a ``run_all.sh`` output folder again, together (the logs interleave workers')."""

from __future__ import annotations

import sys
from pathlib import Path

MARKERS = ("  ", "in-process", "token check", "mixed load", "Traceback", "Error")


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:] or ["/tmp/gpu-out"])[0])
    print("\n==== summary ====")
    for name in ("env.txt", "handoff.log", "token.log", "mixed.log"):
        path = out / name
        if not path.exists():
            print(f"{name}: missing")
            continue
        lines = path.read_text(errors="replace").splitlines()
        keep = lines[:3] if name == "env.txt" else [ln for ln in lines if ln.startswith(MARKERS)]
        print(f"-- {name}")
        for line in keep[-40:]:
            print(line[:400])
    return 0


if __name__ == "__main__":
    sys.exit(main())
