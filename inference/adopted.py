"""The model continuous learning adopted, kept across reloads and inference restarts.

A refit that wins its held-out check (inference/retrain.py) replaces the live
model in the inference process.  That process is restarted at every reload
and after a crash: without a copy, the adopted model would be lost and lb
would go back to the configured one.  So the adopted model is written to
`ADOPTED` in the runtime directory (whole, then renamed: a reader never sees
half a file), with the configured model it grew from; a new inference process
starts from it while the configuration still names that same base model.  An
operator who configures another model gets that one (the adopted file no
longer matches its base), never a model refitted from the old one.

The runtime directory is private to one supervisor unless `runtime_dir` is
configured: set it to keep the adopted model across restarts of lb itself.

The metadata says where the model came from: `retrain` (this instance's
refit) or `fleet` (a model the fleet's leader published, adopted after the
held-out check): a fleet's leader publishes only its own refits
(lb/admin/modelshare.py).  This module reads and writes files only: the
admin process uses it without loading onnxruntime.
"""

from __future__ import annotations

import json
import os
import shutil
import time

ADOPTED = "adopted-model.onnx"
ADOPTED_META = "adopted-model.json"
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "default.onnx")


def base_model(configured: str, default: str) -> str:
    """The configured model's real path (the shipped default when none is)."""
    return os.path.realpath(configured or default)


def save(runtime_dir: str, model_path: str, base: str, version: str, origin: str = "retrain") -> str:
    """Keep `model_path` as the adopted model grown from `base` (`origin`:
    retrain or fleet); returns its path."""
    dst = os.path.join(runtime_dir, ADOPTED)
    meta = os.path.join(runtime_dir, ADOPTED_META)
    shutil.copyfile(model_path, dst + ".tmp")
    os.replace(dst + ".tmp", dst)
    with open(meta + ".tmp", "w") as f:
        json.dump({"base": base, "version": version, "origin": origin, "ts": time.time()}, f)
    os.replace(meta + ".tmp", meta)
    return dst


def meta(runtime_dir: str, base: str) -> dict | None:
    """The adopted model's metadata (base, version, origin, ts) if one was kept
    for this base model."""
    try:
        with open(os.path.join(runtime_dir, ADOPTED_META)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    if (not isinstance(m, dict) or m.get("base") != base
            or not os.path.isfile(os.path.join(runtime_dir, ADOPTED))):
        return None
    return m


def find(runtime_dir: str, base: str) -> str | None:
    """The adopted model's path if one was kept for this base model."""
    return os.path.join(runtime_dir, ADOPTED) if meta(runtime_dir, base) is not None else None
