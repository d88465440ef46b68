"""Request classes: the config's `[[classes]]` rules as one function.

Class 0 is "default", the class of every request no rule matches; rule i is
class i + 1.  A rule matches when every condition it sets holds: the method is
one of `methods`, the target starts with `path_prefix`, and the declared body
size is within [min_body, max_body].  A chunked body has no declared size: it
counts as unbounded, so it only matches rules without `max_body`.

With no rules configured the worker does not classify at all (class 0).
"""

from __future__ import annotations

from typing import Callable

from lb.core.config import RequestClass

CHUNKED = -1  # body size of a chunked request

Classifier = Callable[[bytes, bytes, int], int]


def make_classifier(rules: list[RequestClass]) -> Classifier | None:
    if not rules:
        return None
    compiled = [
        (i + 1, frozenset(m.encode() for m in r.methods), r.path_prefix.encode(),
         r.min_body, r.max_body)
        for i, r in enumerate(rules)
    ]

    def classify(method: bytes, target: bytes, body: int) -> int:
        for idx, methods, prefix, lo, hi in compiled:
            if methods and method not in methods:
                continue
            if prefix and not target.startswith(prefix):
                continue
            if body == CHUNKED:
                if hi:
                    continue
            elif body < lo or (hi and body > hi):
                continue
            return idx
        return 0

    return classify
