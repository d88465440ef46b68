"""Requests for the fuzz test (tests/process/test_fuzz.py): valid ones and
their mutations.  What a strict parser makes of the bytes: tests/fuzz_reference.py.

Everything is drawn from one `random.Random`, so a seed names a run.  A case is
one client connection: one or two valid requests (each with its own target
`/fz/CASE/I`), a few named mutations of their bytes, the random splits they are
sent in, and the response kind the backend uses for each request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tests.fuzz_backend import BROKEN_KINDS, EARLY_KINDS, VALID_KINDS

HOST = b"fuzz.test"

# -- valid requests ------------------------------------------------------------------


def _req(method: bytes, target: bytes, fields: list, body: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    lines = [method + b" " + target + b" " + version] + [k + b": " + v for k, v in fields]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _chunked(rng, body: bytes, trailers: bool) -> bytes:
    out, i = [], 0
    while i < len(body):
        n = rng.randint(1, max(1, len(body) - i))
        ext = rng.choice([b"", b"", b";ext=1", b';name="v"'])
        out.append(b"%x%s\r\n%s\r\n" % (n, ext, body[i:i + n]))
        i += n
    tail = b"0\r\nX-Trailer: yes\r\n\r\n" if trailers else b"0\r\n\r\n"
    return b"".join(out) + tail


def _body(rng) -> bytes:
    n = rng.choice([0, 1, 5, 17, 100, 300])
    return bytes(rng.choice(b"abcdefgh0123456789\r\n \x00\xff") for _ in range(n))


def template(rng, case: int, i: int) -> tuple[str, bytes, bool]:
    """(name, bytes, is_upgrade) of one valid request with target /fz/case/i."""
    target = b"/fz/%d/%d" % (case, i)
    if rng.random() < 0.3:
        target += rng.choice([b"?q=1", b"?a=b&c=%20d", b"/x.y", b"?x=" + b"y" * 50])
    common = [(b"Host", HOST), (b"User-Agent", b"fuzz/1"), (b"Accept", b"*/*")]
    name = rng.choice(["get", "get", "head", "post_cl", "post_chunked", "expect", "upgrade", "http10",
                       "close", "put_extra"])
    if name == "get":
        return name, _req(b"GET", target, common), False
    if name == "head":
        return name, _req(b"HEAD", target, common), False
    if name == "post_cl":
        body = _body(rng)
        return name, _req(b"POST", target, common + [(b"Content-Length", b"%d" % len(body))], body), False
    if name == "post_chunked":
        body = _body(rng)
        return name, _req(b"POST", target, common + [(b"Transfer-Encoding", b"chunked")],
                          _chunked(rng, body, rng.random() < 0.5)), False
    if name == "expect":
        body = _body(rng) or b"x"
        return name, _req(b"PUT", target, common + [(b"Expect", b"100-continue"),
                                                    (b"Content-Length", b"%d" % len(body))], body), False
    if name == "upgrade":
        return name, _req(b"GET", target, common + [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"),
                                                    (b"Sec-WebSocket-Version", b"13")]), True
    if name == "http10":
        return name, _req(b"GET", target, [(b"User-Agent", b"fuzz/1")], version=b"HTTP/1.0"), False
    if name == "close":
        return name, _req(b"GET", target, common + [(b"Connection", b"close")]), False
    body = _body(rng)
    return name, _req(b"DELETE", target, common + [(b"X-Request-Id", b"fz-%d-%d" % (case, i)),
                                                   (b"X-Forwarded-For", b"192.0.2.1"),
                                                   (b"Content-Length", b"%d" % len(body))], body), False


# -- mutations -----------------------------------------------------------------------

INTERESTING = b"\x00\r\n \t:;,_-=\"\x7f\x80\xff0AZaz/?%@"

HOSTILE_LINES = {
    "cl_te": [b"Content-Length: 5", b"Transfer-Encoding: chunked", b"Content-Length: 0"],
    "te_variants": [b"Transfer-Encoding: chunked, chunked", b"Transfer-Encoding: gzip",
                    b"Transfer-Encoding: xchunked", b"Transfer-Encoding: identity", b"Transfer-Encoding:chunked ",
                    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked"],
    "cl_variants": [b"Content-Length: +5", b"Content-Length: 5, 5", b"Content-Length: -1", b"Content-Length: 0x5",
                    b"Content-Length: 5 5", b"Content-Length: 99999999999999999999", b"Content-Length: 1e3",
                    b"Content-Length:"],
    "lookalike": [b"Transfer_Encoding: chunked", b"Content_Length: 1000", b"Transfer---Encoding: chunked",
                  b"Transfer___Encoding: chunked", b"content_length: 3", b"Transfer-Encoding_: chunked",
                  b"Keep_Alive: 1", b"Proxy_Connection: close", b"Upgrade_: x"],
    "space_name": [b"Transfer-Encoding : chunked", b" Transfer-Encoding: chunked", b"Content-Length : 3",
                   b"\tContent-Length: 3"],
    "host": [b"Host: other.test", b"Host:", b"Host: a b/c", b"Host: x@evil.test", b"Host: fuzz.test:99999x"],
    "hop": [b"Connection: close", b"Connection: keep-alive, Content-Length", b"Connection: Upgrade",
            b"Upgrade: websocket", b"Te: trailers", b"Trailer: X-A", b"Proxy-Connection: keep-alive",
            b"Keep-Alive: timeout=1", b"Expect: 100-continue", b"Expect: nonsense", b"X-Request-Id: fz-dup",
            b"Connection: x-drop\r\nX-Drop: 1"],
}

VERSIONS = [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b"HTTP/1.1 ", b"HTTP/0.9", b"HTTP/1", b"HTTP/11"]
METHODS = [b"get", b"CONNECT", b"G_T", b"PRI", b"FOO", b"GET GET", b"", b"OPTIONS", b"TRACE"]


def _lines(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every CRLF-terminated line, the CRLF excluded."""
    out, pos = [], 0
    while True:
        e = data.find(b"\r\n", pos)
        if e < 0:
            return out
        out.append((pos, e))
        pos = e + 2


def _header_lines(data: bytes) -> list[tuple[int, int]]:
    return [(s, e) for s, e in _lines(data) if e > s and b":" in data[s:e] and not data[s:e].startswith(b"0")]


def _pick(rng, seq):
    return seq[rng.randrange(len(seq))] if seq else None


def mutate(rng, data: bytes, name: str) -> bytes:
    if name == "flip":
        i = rng.randrange(len(data))
        return data[:i] + bytes([rng.choice(INTERESTING) if rng.random() < 0.7 else rng.randrange(256)]) + data[i + 1:]
    if name == "insert":
        i = rng.randrange(len(data) + 1)
        return data[:i] + bytes(rng.choice(INTERESTING) for _ in range(rng.randint(1, 3))) + data[i:]
    if name == "delete":
        i = rng.randrange(len(data))
        return data[:i] + data[i + rng.randint(1, 4):]
    if name in ("dup_line", "drop_line", "obs_fold", "upper_name"):
        line = _pick(rng, _header_lines(data))
        if line is None:
            return data
        s, e = line
        if name == "dup_line":
            return data[:e + 2] + data[s:e + 2] + data[e + 2:]
        if name == "drop_line":
            return data[:s] + data[e + 2:]
        if name == "upper_name":
            c = data.index(b":", s)
            return data[:s] + data[s:c].upper() + data[c:]
        c = data.index(b":", s) + 1
        i = rng.randint(c, e)
        return data[:i] + rng.choice([b"\r\n ", b"\r\n\t", b"\n "]) + data[i:]
    if name in HOSTILE_LINES:
        line = rng.choice(HOSTILE_LINES[name])
        heads = [m.end() for m in re.finditer(rb"HTTP/1\.[01]\r\n", data)]
        i = _pick(rng, heads)
        if i is None:
            return data
        return data[:i] + line + b"\r\n" + data[i:]
    if name == "bare_lf":
        spots = [m.start() for m in re.finditer(rb"\r\n", data)]
        i = _pick(rng, spots)
        return data if i is None else data[:i] + data[i + 1:]
    if name == "bare_cr":
        spots = [m.start() for m in re.finditer(rb"\r\n", data)]
        i = _pick(rng, spots)
        return data if i is None else data[:i + 1] + data[i + 2:]
    if name == "nul":
        i = rng.randrange(len(data) + 1)
        return data[:i] + b"\x00" + data[i:]
    if name == "huge_number":
        spots = list(re.finditer(rb"(?<=: )\d+|(?<=\n)[0-9a-f]+(?=[\r;])", data))
        m = _pick(rng, spots)
        if m is None:
            return data
        return data[:m.start()] + rng.choice([b"99999999999999999999", b"fffffffffffffffff0", b"18446744073709551616",
                                               b"0000000000000000000005"]) + data[m.end():]
    if name == "version":
        spots = [m.start() for m in re.finditer(rb"HTTP/1\.[01]", data)]
        i = _pick(rng, spots)
        return data if i is None else data[:i] + rng.choice(VERSIONS) + data[i + 8:]
    if name == "method":
        spots = [0] + [m.end() for m in re.finditer(rb"\r\n\r\n", data)][:-1]
        i = _pick(rng, [s for s in spots if s < len(data)])
        if i is None:
            return data
        sp = data.find(b" ", i)
        return data if sp < 0 else data[:i] + rng.choice(METHODS) + data[sp:]
    if name == "absolute":
        m = _pick(rng, list(re.finditer(rb" (/fz/)", data)))
        if m is None:
            return data
        return data[:m.start(1)] + rng.choice([b"http://evil.test", b"http://fuzz.test", b"https://evil.test:8443",
                                               b"http://"]) + data[m.start(1):]
    if name == "truncate":
        return data[:rng.randrange(1, len(data))]
    if name == "append":
        return data + rng.choice([b"\r\n", b"GET /", b"\x00\x00", b"GARBAGE\r\n\r\n", b"0\r\n\r\n",
                                  b"GET /fz/x HTTP/1.1\r\nHost: fuzz.test\r\n\r\n"])
    raise ValueError(name)


MUTATIONS = ["flip", "insert", "delete", "dup_line", "drop_line", "obs_fold", "upper_name", "bare_lf", "bare_cr",
             "nul", "huge_number", "version", "method", "absolute", "truncate", "append"] + list(HOSTILE_LINES)


@dataclass
class Case:
    id: int
    templates: list  # names of the valid requests it started from
    data: bytes  # what the client sends
    splits: list  # piece sizes
    kinds: dict  # target -> backend response kind
    mutations: list
    tunnel: bytes = b""  # sent after a 101, echoed by the backend
    expect_wait: bool = False  # send the first head, then wait for 100 Continue (or an answer)

    def repro(self) -> str:
        return (f"case {self.id}: templates={self.templates} mutations={self.mutations} "
                f"backend={ {k.decode(): v for k, v in self.kinds.items()} } splits={self.splits}"
                f"{' (waits for 100 Continue)' if self.expect_wait else ''}\n"
                f"  data={self.data!r}")


def make_case(rng, case_id: int, exclude: frozenset = frozenset()) -> Case:
    n = 2 if rng.random() < 0.3 else 1
    names, parts, kinds = [], [], {}
    upgrade = False
    for i in range(n):
        name, raw, is_upgrade = template(rng, case_id, i)
        if upgrade:  # nothing is pipelined behind an upgrade: those bytes belong to the tunnel
            break
        names.append(name)
        parts.append(raw)
        target = raw.split(b" ", 2)[1]
        if is_upgrade:
            upgrade = True
            kinds[target] = "switch" if rng.random() < 0.6 else rng.choice(VALID_KINDS)
        elif name in ("post_cl", "post_chunked", "expect", "put_extra") and rng.random() < 0.25:
            kinds[target] = rng.choice(sorted(EARLY_KINDS))  # answered before its body
        elif rng.random() < 0.35:
            kinds[target] = rng.choice(BROKEN_KINDS)
        else:
            kinds[target] = rng.choice(VALID_KINDS)
    data = b"".join(parts)
    mutations = []
    if rng.random() < 0.8:
        allowed = [m for m in MUTATIONS if m not in exclude]
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            m = rng.choice(allowed)
            mutated = mutate(rng, data, m)
            if mutated:
                data = mutated
                mutations.append(m)
    splits = []
    left = len(data)
    while left > 0:
        if rng.random() < 0.15:
            size = 1
        else:
            size = rng.randint(1, max(1, left if rng.random() < 0.4 else 40))
        size = min(size, left)
        splits.append(size)
        left -= size
        if len(splits) > 12:
            splits.append(left)
            break
    splits = [s for s in splits if s]
    tunnel = b"ping\x00\r\n\r\nGET /tunnel HTTP/1.1\r\n\r\n" if upgrade else b""
    expect_wait = names[0] == "expect" and rng.random() < 0.5
    return Case(case_id, names, data, splits, kinds, mutations, tunnel, expect_wait)
