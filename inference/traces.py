"""Trace files: sampled requests joined with the features they were routed on.

Format: numpy `.npz` (compressed), one file per chunk, named
`trace-<unix ns>-<pid>.npz`, holding equal-length columns

    features  float32 (n, F)   the row of the table the request was routed with
    latency   float32 (n,)     seconds to the response head (or to the failure)
    ok        bool    (n,)     False: 5xx or no response
    backend   str     (n,)     backend name
    cls       str     (n,)     request class name
    ts        float64 (n,)     time.time() of the worker report that carried it
    feature_names str (F,)     the column names (checked when read)

Files are written whole under a temporary name and renamed, so a reader never
sees half a file.  The writer keeps at most `max_files` files in its
directory (the oldest are removed: rotation).
"""

from __future__ import annotations

import glob
import os
import time

import numpy as np

from inference.features import FEATURES, N_FEATURES

COLUMNS = ("features", "latency", "ok", "backend", "cls", "ts")


class TraceError(Exception):
    pass


class TraceWriter:
    def __init__(self, directory: str, *, flush_every: float = 10.0, max_records: int = 20_000,
                 max_files: int = 500) -> None:
        self.directory = directory
        self.flush_every = flush_every
        self.max_records = max_records
        self.max_files = max_files
        self.pending: list[dict[str, np.ndarray]] = []
        self.n = 0
        self.last_flush = time.monotonic()
        self.written = 0
        os.makedirs(directory, exist_ok=True)

    def add(self, records: dict[str, np.ndarray]) -> None:
        self.pending.append(records)
        self.n += len(records["latency"])
        if self.n >= self.max_records or time.monotonic() - self.last_flush >= self.flush_every:
            self.flush()

    def flush(self) -> str | None:
        self.last_flush = time.monotonic()
        if not self.pending:
            return None
        merged = concat(self.pending)
        self.pending, self.n = [], 0
        path = write(self.directory, merged)
        self.written += len(merged["latency"])
        files = sorted(glob.glob(os.path.join(self.directory, "trace-*.npz")))
        for old in files[: max(0, len(files) - self.max_files)]:
            try:
                os.unlink(old)
            except OSError:
                pass
        return path


def concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([c[k] for c in chunks]) for k in COLUMNS}


def write(directory: str, records: dict[str, np.ndarray], name: str | None = None) -> str:
    name = name or f"trace-{time.time_ns():020d}-{os.getpid()}.npz"
    path = os.path.join(directory, name)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, feature_names=np.array(FEATURES), **{k: records[k] for k in COLUMNS})
    os.replace(tmp, path)
    return path


def _files(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "*.npz")))
            if not found:
                raise TraceError(f"{p}: no .npz trace files in this directory")
            out += found
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise TraceError(f"{p}: no such file or directory")
    return out


def read(paths: list[str]) -> dict[str, np.ndarray]:
    """Every record of the given files and directories, ordered by time."""
    chunks = []
    for path in _files(paths):
        try:
            with np.load(path, allow_pickle=False) as z:
                names = tuple(str(n) for n in z["feature_names"]) if "feature_names" in z else ()
                if names != FEATURES:
                    raise TraceError(f"{path}: recorded with other features ({len(names)} columns); "
                                     f"this lb uses {N_FEATURES}")
                missing = [k for k in COLUMNS if k not in z]
                if missing:
                    raise TraceError(f"{path}: missing columns {missing}")
                chunk = {k: z[k] for k in COLUMNS}
        except TraceError:
            raise
        except Exception as exc:  # noqa: BLE001 - zip/npy errors come in many types
            raise TraceError(f"{path}: not a trace file ({type(exc).__name__}: {str(exc)[:120]})") from None
        n = len(chunk["latency"])
        if chunk["features"].shape != (n, N_FEATURES) or any(len(chunk[k]) != n for k in COLUMNS):
            raise TraceError(f"{path}: columns of different lengths or wrong feature shape")
        chunks.append(chunk)
    data = concat(chunks)
    order = np.argsort(data["ts"], kind="stable")
    return {k: v[order] for k, v in data.items()}
