"""The contract between the proxy's two sides (workers/contract.py): the
exchange provides what the upstream side may call, the client connection
what the exchange needs, and the upstream side names nothing else of the
client connection."""

from __future__ import annotations

import ast
import inspect

from lb.core import config
from tests.memtransport import Transport
from workers import contract, upstream
from workers.downstream import Downstream
from workers.exchange import Exchange
from workers.worker import Worker


def test_the_sides_provide_the_contract():
    w = Worker(config.from_dict({"backends": [{"address": "127.0.0.1:9"}]}))
    down = Downstream(w)
    down.connection_made(Transport())
    ex = Exchange(down, b"GET", b"GET / HTTP/1.1\r\n\r\n")
    assert isinstance(ex, contract.ClientSide)
    assert isinstance(down, contract.ClientConnection)


def test_the_upstream_side_reaches_no_further_than_the_contract():
    """Every attribute workers/upstream.py takes from an exchange (`ex.X`,
    `self.ex.X`) is one the contract names or one the dispatcher set for it
    (its backend, timing, class and guard bookkeeping)."""
    allowed = set(contract.ClientSide.__annotations__) | {
        n for n, _ in inspect.getmembers(contract.ClientSide) if not n.startswith("_")}
    # what the dispatcher and the parsed head leave on the exchange for the response side
    allowed |= {"cls", "t0", "load", "guard", "arm", "guard_t0", "plain", "body_done", "upgrade",
                "method", "http10", "bound", "curve", "work", "mix", "last_io", "held"}
    used = set()
    for node in ast.walk(ast.parse(inspect.getsource(upstream))):
        if isinstance(node, ast.Attribute):
            base = node.value
            if isinstance(base, ast.Name) and base.id == "ex" or (
                    isinstance(base, ast.Attribute) and base.attr == "ex"):
                used.add(node.attr)
    assert "conn" not in used, "the upstream side reaches into the client connection"
    assert used <= allowed, used - allowed
