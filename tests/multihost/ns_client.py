"""A tiny HTTP client the multi-host tests run in a host namespace (`ip netns exec NS python ns_client.py`).

Standard library only (starts fast), never through a proxy. Every command prints JSON on stdout:

    get URL                  {"status": 200, "body": "..."}
    etcd-keys URL PREFIX     {"status": 200, "keys": [...]}           (etcd's v3 JSON gateway, keys only)
    stream URL BODY          one line per SSE event as it arrives:    {"t": <monotonic>, "data": <event>}
                             first {"t", "status"}, last {"t", "end": true}
                             (an HTTP error instead: {"t", "status", "body"})
"""

from __future__ import annotations

import base64
import http.client
import json
import sys
import time
import urllib.parse


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout)
    return conn, parts.path + (f"?{parts.query}" if parts.query else "")


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def get(url: str) -> None:
    conn, path = _connection(url, 5)
    conn.request("GET", path)
    r = conn.getresponse()
    _emit({"status": r.status, "body": r.read().decode(errors="replace")})


def etcd_keys(url: str, prefix: str) -> None:
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    body = {
        "key": base64.b64encode(prefix.encode()).decode(),
        "range_end": base64.b64encode(end.encode()).decode(),
        "keys_only": True,
    }
    conn, _ = _connection(url, 5)
    conn.request("POST", "/v3/kv/range", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    reply = json.loads(r.read() or b"{}")
    keys = [base64.b64decode(kv["key"]).decode() for kv in reply.get("kvs", [])]
    _emit({"status": r.status, "keys": keys})


def stream(url: str, body: str) -> None:
    conn, path = _connection(url, 60)
    conn.request("POST", path, body, {"Content-Type": "application/json", "Accept": "text/event-stream"})
    r = conn.getresponse()
    if r.status != 200:
        _emit({"t": time.monotonic(), "status": r.status, "body": r.read().decode(errors="replace")})
        return
    _emit({"t": time.monotonic(), "status": r.status})
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:].decode()
        _emit({"t": time.monotonic(), "data": data if data == "[DONE]" else json.loads(data)})
    _emit({"t": time.monotonic(), "end": True})


def main(argv: list[str]) -> int:
    command, *args = argv
    try:
        {"get": get, "etcd-keys": etcd_keys, "stream": stream}[command](*args)
    except (OSError, http.client.HTTPException, ValueError) as e:
        _emit({"t": time.monotonic(), "error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
