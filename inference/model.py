"""The scoring model: one ONNX file, loaded with onnxruntime (no scikit-learn here).

Contract of a model file (written by `inference.train.export`):
  * one input `X`, float32, shape (n, F), columns in the order of
    `inference.features.FEATURES`;
  * two outputs, `latency` (seconds, > 0) and `error` (probability in [0, 1]),
    each of shape (n,) or (n, 1);
  * metadata_props `lb.features` (the feature names, comma-separated) and
    `lb.version` (a version string shown in every table).
`Model.load` checks all of it and raises `ModelError("<path>: <problem>")`.
"""

from __future__ import annotations

import os

import numpy as np

from inference.adopted import SHIPPED
from inference.features import FEATURES

DEFAULT_MODEL = SHIPPED
META_FEATURES = "lb.features"
META_VERSION = "lb.version"


class ModelError(Exception):
    pass


class Model:
    def __init__(self, session, path: str, version: str, features: tuple[str, ...]) -> None:
        self.session = session
        self.path = path
        self.version = version
        self.features = features

    @classmethod
    def load(cls, path: str) -> "Model":
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise ModelError(f"{path}: no such model file")
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except OSError as exc:
            raise ModelError(f"{path}: {exc.strerror or exc}") from None
        return cls.from_bytes(blob, path, ort)

    @classmethod
    def from_bytes(cls, blob: bytes, path: str = "<memory>", ort=None) -> "Model":
        if ort is None:
            import onnxruntime as ort
        opts = ort.SessionOptions()
        # one thread: the batch is small, and the machine's other cores serve requests
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 4
        try:
            session = ort.InferenceSession(blob, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{path}: not a valid ONNX model ({first})") from None
        inputs = session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != "X":
            raise ModelError(f"{path}: expected one input named X, found {[i.name for i in inputs]}")
        shape = inputs[0].shape
        if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != len(FEATURES)):
            raise ModelError(f"{path}: input X has shape {shape}, expected (n, {len(FEATURES)})")
        if inputs[0].type != "tensor(float)":
            raise ModelError(f"{path}: input X is {inputs[0].type}, expected tensor(float)")
        outs = {o.name for o in session.get_outputs()}
        if not {"latency", "error"} <= outs:
            raise ModelError(f"{path}: expected outputs 'latency' and 'error', found {sorted(outs)}")
        meta = session.get_modelmeta().custom_metadata_map
        names = tuple(n for n in meta.get(META_FEATURES, "").split(",") if n)
        if names != FEATURES:
            if not names:
                raise ModelError(f"{path}: no '{META_FEATURES}' metadata (not a model made by lb train)")
            missing = [n for n in FEATURES if n not in names]
            extra = [n for n in names if n not in FEATURES]
            raise ModelError(f"{path}: feature list mismatch (missing {missing}, unknown {extra}, "
                             f"or another order)")
        version = meta.get(META_VERSION, "") or "unversioned"
        return cls(session, path, version, names)

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(latency seconds, error probability), one of each per row of X."""
        if X.shape[0] == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        lat, err = self.session.run(["latency", "error"], {"X": np.ascontiguousarray(X, dtype=np.float32)})
        lat = np.asarray(lat, dtype=np.float64).reshape(-1)
        err = np.asarray(err, dtype=np.float64).reshape(-1)
        # guard against a model that outputs nonsense (NaN, <= 0): it must not break routing
        lat = np.where(np.isfinite(lat), np.clip(lat, 1e-5, 60.0), 60.0)
        err = np.where(np.isfinite(err), np.clip(err, 0.0, 1.0), 1.0)
        return lat, err
