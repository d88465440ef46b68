"""The request corpus (tests/corpus/*.http): one raw request per file, its first
line saying what lb must answer (`# expect STATUS... [forwarded[=N]] [partial]
[closed] [body=N] [config=NAME] [target=T] [host=H]`), comments after it, then
the request bytes with escapes.  Read by tests/process/test_request_corpus.py (over
real sockets) and tests/unit/test_fastpath.py (the scanner, in memory)."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"
CASE_FILES = sorted(CORPUS.glob("*.http"))

CONFIGS = {
    "default": "",
    "small_body": "[limits]\nmax_body_size = 1000",
}

_EXPECT_RE = re.compile(r"^# expect (?P<spec>.+?)\s*$")
_STATUS_RE = re.compile(r"^(?:\d{3}|none)(?:\|(?:\d{3}|none))*$")


@dataclass
class Case:
    name: str
    statuses: list[set[str]]
    data: bytes
    forwarded: int = 0
    partial: bool = False
    closed: bool = False
    body: int = 0
    config: str = "default"
    target: str | None = None  # the request-target the backend must get, if not the case's own
    host: str | None = None  # the Host (and X-Forwarded-Host) the backend must get
    comment: str = ""


def parse_case(path: Path) -> Case:
    text = path.read_bytes().decode("ascii")
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"{path.name}: empty file")
    m = _EXPECT_RE.match(lines[0])
    if not m:
        raise ValueError(f"{path.name}: first line must be '# expect STATUS ...', got {lines[0]!r}")
    statuses: list[set[str]] = []
    words: list[str] = []
    for tok in m.group("spec").split():
        if not words and _STATUS_RE.match(tok):
            statuses.append(set(tok.split("|")))
        else:
            words.append(tok)
    if not statuses:
        raise ValueError(f"{path.name}: no status in {lines[0]!r}")
    if any("none" in s for s in statuses[:-1]):
        raise ValueError(f"{path.name}: 'none' is only allowed in the last status")
    case = Case(name=path.stem, statuses=statuses, data=b"")
    for w in words:
        key, _, val = w.partition("=")
        if key == "forwarded":
            case.forwarded = int(val) if val else 1
        elif key == "partial" and not val:
            case.partial = True
        elif key == "closed" and not val:
            case.closed = True
        elif key == "body" and val.isdigit():
            case.body = int(val)
        elif key == "config" and val in CONFIGS:
            case.config = val
        elif key == "target" and val:
            case.target = val
        elif key == "host" and val:
            case.host = val
        else:
            raise ValueError(f"{path.name}: unknown word {w!r} in expect line")
    if case.partial and case.forwarded:
        raise ValueError(f"{path.name}: 'partial' and 'forwarded' exclude each other")
    last = statuses[-1]
    if any(s != "none" and int(s) >= 400 for s in last):
        case.closed = True
    i = 1
    comments = []
    while i < len(lines) and lines[i].startswith("#"):
        comments.append(lines[i].lstrip("# "))
        i += 1
    case.comment = " ".join(comments)
    raw = "".join(lines[i:])
    case.data = codecs.escape_decode(raw.encode("ascii"))[0]
    if not case.data:
        raise ValueError(f"{path.name}: no request bytes")
    return case
