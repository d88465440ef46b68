"""Operator overrides (drained backends, the pinned strategy), health verdicts and the fleet.

The admin process owns this state.  It is published as `lb.core.messages.Control`
through a Clone-pattern `Publisher` (workers and the inference process
subscribe), republished at least once a second and at once on every change,
and persisted to a small JSON file in the runtime directory so that a
restarted admin process keeps the operator's decisions.
"""

from __future__ import annotations

import json
import os
import time

import zmq

from lb.core import log
from lb.core.clone import Publisher
from lb.core.config import STRATEGIES
from lb.core.messages import TOPIC_CONTROL, Control, encode, endpoints

STATE_FILE = "admin-control.json"
REPUBLISH = 1.0  # seconds


class ControlState:
    def __init__(self, ctx: zmq.Context, runtime_dir: str, fleet=None) -> None:
        ep = endpoints(runtime_dir)
        self.fleet = fleet  # lb.admin.fleet.Fleet, or None: the workers keep the config's backends
        self.path = os.path.join(runtime_dir, STATE_FILE)
        self.drained: list[str] = []
        self.pinned: str = ""
        self.down: list[str] = []
        # the fleet's learned model (lb/admin/modelshare.py): (trains, file, version, member)
        self.model: tuple[bool, str, str, str] = (True, "", "", "")
        self._load()
        self.publisher = Publisher(ctx, ep["control"], ep["control_snapshot"], TOPIC_CONTROL)
        self.published_at = 0.0
        self.publish()

    def _load(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.log("admin_state_unreadable", path=self.path, error=str(exc))
            return
        if not isinstance(data, dict):
            log.log("admin_state_unreadable", path=self.path, error="not a JSON object")
            return
        drained = data.get("drained", [])
        if isinstance(drained, list):
            self.drained = sorted({d for d in drained if isinstance(d, str)})
        pinned = data.get("pinned_strategy", "")
        if isinstance(pinned, str) and (pinned == "" or pinned in STRATEGIES):
            self.pinned = pinned
        log.log("admin_state_loaded", drained=self.drained, pinned_strategy=self.pinned)

    def _save(self) -> None:
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"drained": self.drained, "pinned_strategy": self.pinned}, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.log("admin_state_write_failed", path=self.path, error=str(exc))

    def message(self) -> Control:
        epoch, seq = self.publisher.next_version()
        f = self.fleet
        drained = sorted(set(self.drained) | f.etcd_drained) if f is not None else list(self.drained)
        return Control(epoch=epoch, seq=seq, ts=time.time(), drained=drained,
                       pinned_strategy=self.pinned, down=list(self.down),
                       discovered=dict(f.dns) if f is not None else {},
                       added=list(f.api.values()) if f is not None else [],
                       shared=list(f.etcd.values()) if f is not None else [],
                       fleet_known=f is not None, trains=self.model[0], shared_model=self.model[1],
                       shared_version=self.model[2], shared_from=self.model[3])

    def publish(self) -> None:
        self.publisher.publish(encode(self.message()))
        self.published_at = time.monotonic()

    def tick(self) -> None:
        """Answer snapshot requests; republish when a second has passed."""
        self.publisher.serve_snapshots()
        if time.monotonic() - self.published_at >= REPUBLISH * 0.9:  # (called once a second)
            self.publish()

    # -- changes (each one saved and published at once) ----------------------

    def set_drained(self, name: str, drained: bool) -> bool:
        """True if the state changed."""
        present = name in self.drained
        if present == drained:
            return False
        if drained:
            self.drained = sorted(self.drained + [name])
        else:
            self.drained = [d for d in self.drained if d != name]
        self._changed("backend_drained" if drained else "backend_enabled", backend=name)
        return True

    def set_pinned(self, strategy: str) -> bool:
        if strategy == self.pinned:
            return False
        self.pinned = strategy
        self._changed("strategy_pinned" if strategy else "strategy_unpinned", strategy=strategy)
        return True

    def set_down(self, down: list[str]) -> None:
        """The active health checks' verdict (not persisted: checks run again)."""
        if down != self.down:
            self.down = list(down)
            self.publish()

    def set_model(self, trains: bool, path: str, version: str, member: str) -> None:
        """Who trains, and the fleet's latest model (not persisted: the leader
        and the model are read from etcd again)."""
        model = (trains, path, version, member)
        if model != self.model:
            self.model = model
            self.publish()

    def _changed(self, event: str, **fields) -> None:
        log.log(event, **fields)
        self._save()
        self.publish()

    def close(self) -> None:
        self.publisher.close()
