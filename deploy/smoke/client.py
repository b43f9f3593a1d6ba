"""The smoke test's client (deploy/smoke_docker.sh), standard library only: it runs with the host's
python3, outside the image.

    client.py png RESPONSE.json OUT.png       decode the first image of a /v1/generate answer, check it
    client.py load URL JOBS CLIENTS OUT.json  JOBS requests from CLIENTS threads; OUT.json gets
                                              {"answered": n, "ok": n, "bad": {...}, "seconds": s}
                                              and OUT.json.progress the count answered so far
"""

from __future__ import annotations

import base64
import json
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG after checking its signature, chunk CRCs, pixel data and row filters."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert zlib.crc32(kind + chunk) == crc, f"bad CRC in {kind}"
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + n
        if kind == b"IEND":
            break
    w, h, depth, ctype, _, _, interlace = ihdr
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[ctype]
    raw = zlib.decompress(idat)
    stride = w * channels * depth // 8
    assert interlace == 0 and len(raw) == h * (stride + 1), "pixel data has the wrong length"
    assert all(raw[r * (stride + 1)] <= 4 for r in range(h)), "bad row filter"
    return w, h


def png(response: str, out: str) -> None:
    body = json.load(open(response))
    data = base64.b64decode(body["images"][0]["b64_json"])
    open(out, "wb").write(data)
    w, h = png_size(data)
    print(f"{w}x{h}, {len(data)} bytes, seed {body['seed']}, server total {body['timings']['total_ms']:.0f} ms")
    assert (w, h) == (32, 32), f"expected 32x32, got {w}x{h}"


def load(url: str, jobs: int, clients: int, out: str) -> None:
    answers: dict[int, object] = {}
    lock = threading.Lock()

    def one(i: int) -> object:
        body = json.dumps({"prompt": ("a red circle", "a blue square above a green triangle")[i % 2],
                           "seed": 5000 + i}).encode()
        req = urllib.request.Request(f"{url}/v1/generate", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                data = base64.b64decode(json.load(r)["images"][0]["b64_json"])
                return "ok" if png_size(data) == (32, 32) else "not a 32x32 PNG"
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code}: {e.read()[:200]!r}"
        except Exception as e:  # recorded: the report names it
            return f"{type(e).__name__}: {e}"

    def client(c: int) -> None:
        for i in range(c, jobs, clients):
            answer = one(i)
            with lock:
                answers[i] = answer
                open(out + ".progress", "w").write(str(len(answers)))

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bad = {i: a for i, a in answers.items() if a != "ok"}
    json.dump({"answered": len(answers), "ok": len(answers) - len(bad), "bad": bad,
               "seconds": round(time.monotonic() - t0, 1)}, open(out, "w"))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "png":
        png(*args)
    elif cmd == "load":
        load(args[0], int(args[1]), int(args[2]), args[3])
    else:
        sys.exit(f"unknown command {cmd!r}")
