"""The fleet's learned model: one member trains, the others adopt what it publishes.

Under the fleet's prefix (beside `backends/` and `members/`, lb/admin/etcd.py):

    PREFIX/leader   the id of the member that trains, put under its lease
    PREFIX/model    {"version", "member", "ts", "onnx": base64 of the model file}

**Election.** Every `lease_ttl / 3` seconds each member that learns
(`learning.retrain_interval` > 0) tries to create PREFIX/leader with its own
lease, in one etcd transaction that succeeds only if the key does not exist:
the first member to try leads, the others read who does.  The leader keeps
the key alive by refreshing its lease (it does so anyway, for its
`members/` entry).  A leader that stops, crashes or loses etcd stops
refreshing: etcd deletes the key when the lease expires and the next member
to try takes it, within `lease_ttl` + `lease_ttl / 3`.

**Training and publishing.** Only the leader's inference process refits
(`Control.trains`); the others keep collecting their records but start no
refit.  When the leader's refit wins its held-out check, the inference
process keeps it as the adopted model (inference/adopted.py, origin
`retrain`); this module finds it there and publishes it under PREFIX/model
(a few KiB: the value fits etcd's request limit with room to spare).  A
member that becomes leader publishes only refits it makes itself, newer than
the published one, never an older model it happened to hold.

**Adopting.** Every member reads PREFIX/model; a new version is written to
the runtime directory and announced to the inference process
(`Control.shared_model`), which judges it against its live model on its own
most recent records as its own refits are judged, held-out loss and then the
routing of a simulated copy of its fleet (inference/retrain.py, in the same
child process), and adopts it only if it passes there
(`model_adopted` / `model_declined`).  An adopted model is kept like a refit,
so a reload or restart keeps it.

etcd away: the member keeps its role and its model; nothing is published or
adopted until etcd answers again.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time

from lb.core import log

from inference import adopted

FLEET_MODEL = "fleet-model.onnx"  # in the runtime directory: the latest version read from etcd
MAX_MODEL_BYTES = 1 << 20  # etcd's default request limit is 1.5 MiB


class ModelShare:
    def __init__(self, state, member_id: str, prefix: bytes) -> None:
        self.state = state  # AdminState: .cfg, .runtime_dir, .control
        self.id = member_id
        self.leader_key = prefix + b"leader"
        self.model_key = prefix + b"model"
        self.leader = ""  # the member in PREFIX/leader; "" before the first answer
        self.version = ""  # the version under PREFIX/model, as last read
        self.model_ts = 0.0  # when it was published
        self.model_from = ""  # by whom
        self.path = ""  # its file in the runtime directory
        self.published = 0  # versions this member published
        self._rev = 0  # the PREFIX/model revision read last (valid or not)

    @property
    def learns(self) -> bool:
        return self.state.cfg.learning.retrain_interval > 0

    @property
    def leads(self) -> bool:
        return self.leader == self.id

    async def step(self, client, lease) -> None:
        """One round: campaign (or read the leader), publish a new refit if we
        lead, read the published model; then tell the inference process."""
        if self.learns:
            t = client.transactions
            won, responses = await client.transaction(
                compare=[t.create(self.leader_key) == 0],
                success=[t.put(self.leader_key, self.id.encode(), lease)],
                failure=[t.get(self.leader_key)])
            leader = self.id if won else _first_value(responses)
        else:
            got = await client.get(self.leader_key)
            leader = got.value.decode("utf-8", "replace") if got is not None else ""
        if leader != self.leader:
            log.log("fleet_leader", member=self.id, leader=leader or None,
                    role="leader" if leader == self.id else "follower")
            self.leader = leader
        await self._read_model(client)
        if self.leads and self.learns:
            await self._publish(client)
        self.state.control.set_model(self.leads or not self.leader, self.path, self.version, self.model_from)

    async def _read_model(self, client) -> None:
        got = await client.get(self.model_key)
        if got is None or got.mod_revision == self._rev:
            return
        try:
            d = json.loads(got.value)
            version, member, ts = d["version"], d.get("member", ""), float(d.get("ts", 0))
            if not isinstance(version, str) or not version or not isinstance(member, str):
                raise ValueError("version and member: strings")
            if version == self.version:
                self._rev = got.mod_revision
                return
            blob = base64.b64decode(d["onnx"], validate=True)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, binascii.Error) as exc:
            self._rev = got.mod_revision
            log.log("fleet_model_invalid", error=f"{type(exc).__name__}: {exc}"[:300])
            return
        path = os.path.join(self.state.runtime_dir, FLEET_MODEL)
        try:
            with open(path + ".tmp", "wb") as f:
                f.write(blob)
            os.replace(path + ".tmp", path)
        except OSError as exc:
            log.log("fleet_model_write_failed", path=path, error=str(exc))
            return
        self.version, self.model_from, self.model_ts, self.path = version, member, ts, path
        self._rev = got.mod_revision
        log.log("fleet_model_seen", version=version, member=member, bytes=len(blob))

    async def _publish(self, client) -> None:
        """Publish our own newest refit, if it is newer than the fleet's model."""
        cfg = self.state.cfg
        base = adopted.base_model(cfg.learning.model, adopted.SHIPPED)
        meta = adopted.meta(self.state.runtime_dir, base)
        if (meta is None or meta.get("origin", "retrain") != "retrain" or meta.get("version") == self.version
                or float(meta.get("ts", 0)) <= self.model_ts):
            return
        try:
            with open(os.path.join(self.state.runtime_dir, adopted.ADOPTED), "rb") as f:
                blob = f.read(MAX_MODEL_BYTES + 1)
        except OSError:
            return
        if len(blob) > MAX_MODEL_BYTES:
            log.log("fleet_model_too_large", version=meta["version"], bytes=len(blob))
            return
        ts = time.time()
        value = {"version": meta["version"], "member": self.id, "ts": ts,
                 "onnx": base64.b64encode(blob).decode()}
        await client.put(self.model_key, json.dumps(value).encode())
        self.published += 1
        log.log("fleet_model_published", version=meta["version"], member=self.id, bytes=len(blob))
        await self._read_model(client)

    def view(self) -> dict:
        return {"leader": self.leader or None, "leads": self.leads,
                "model": ({"version": self.version, "member": self.model_from, "published": self.model_ts}
                          if self.version else None)}


def _first_value(responses) -> str:
    """The value of the Get in a failed transaction's responses ("" if none)."""
    for r in responses:
        for value, _meta in r if isinstance(r, list) else ():
            return value.decode("utf-8", "replace")
    return ""
