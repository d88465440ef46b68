"""The typed contract between the two sides of the proxy (docs/architecture.md).

`UpstreamConnection` (workers/upstream.py) serves one exchange at a time and
sees it only as a `ClientSide`; the exchange (workers/exchange.py) sees the
client connection only as a `ClientConnection`.  Neither side reaches past
these: tests/unit/test_contract.py checks that the classes provide them and
that the upstream side names nothing else of the exchange's connection.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...


@runtime_checkable
class ClientSide(Protocol):
    """What the upstream side may do with the exchange it serves."""

    client: Sink  # response bytes for the client, written as they are relayed
    status: int
    response_started: bool
    keep_alive: bool

    def pause_client(self) -> None: ...  # the backend connection's send buffer is full
    def resume_client(self) -> None: ...
    def complete(self) -> None: ...  # the response ended: the next request, or close
    def failed(self, *, sent_nothing: bool, status: int, reused: bool = False) -> None: ...
    def answer_error(self, status: int) -> None: ...  # the backend broke the protocol before answering
    def cut(self) -> None: ...  # the response broke off after it started
    def unbind(self) -> None: ...  # no longer counted against its backend


@runtime_checkable
class ClientConnection(Protocol):
    """What an exchange needs of the client connection that owns it."""

    transport: Sink
    closed: bool

    def response_done(self, ex) -> None: ...
    def write_error(self, ex, status: int) -> None: ...
    def abort_after_upstream(self, ex) -> None: ...
