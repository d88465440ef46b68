"""`lb train`: fit the scoring model on traces and export it to ONNX.

Estimator: scikit-learn's `MLPRegressor` (two hidden layers, 32 and 16 ReLU
units) behind a `StandardScaler`, with two outputs fitted jointly:
ln(latency) and the failure indicator (its least-squares fit is the failure
probability).  Why this one (see docs/learning.md): it is smooth in its inputs
(in-flight, recent latency), so weights move gradually instead of jumping at
tree split points; it extrapolates a trend beyond the range seen in training
(a backend slower than any in the trace is still predicted slow); one model
gives both outputs; it scores 8,000 rows in well under a millisecond (two
small matrix products); and skl2onnx converts it exactly.  Fitting is
deterministic given `--seed`.

The latency is fitted as a correction of what the cell itself showed
recently: ln(latency) minus `lat_ewma_log` (BASE_COLUMN).  The ONNX graph
produced by skl2onnx is extended with a few nodes so the file has the outputs
the inference process expects: `latency` = exp(column 0 + lat_ewma_log) and
`error` = clip(column 1, 0, 1).  Feature names and a version string are
stored in metadata_props (checked by `inference.model.Model.load`).

This module imports scikit-learn; the inference process's scoring path never
does (it only needs onnxruntime).
"""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np

from inference.features import FEATURES, N_FEATURES
from inference.model import META_FEATURES, META_VERSION, Model
from inference.traces import TraceError, read

MIN_RECORDS = 50
MAX_RECORDS = 200_000  # the most recent ones are used
HIDDEN = (32, 16)
# L2 penalty.  Strong on purpose: the trace is captured with random routing,
# so a good policy's states (a favourite with most of the traffic, a backend
# with almost none) lie off the trace; a heavily regularised network keeps its
# corrections small and smooth there instead of inventing structure (measured
# in the simulator: 1e-4 let single backends attract 70-85% of the traffic
# of identical ones; 0.1 under-predicted the failure probability of a
# backend receiving little traffic).
ALPHA = 0.03
MIN_LATENCY = 1e-4
ERROR_WEIGHT = 2.0  # weight of the error (Brier) term in `score`
SWAP_MARGIN = 0.02  # a challenger must be 2% better to replace the live model


class TrainError(Exception):
    pass


# The latency output is learned as a correction of the cell's own recent mean:
# the network fits ln(latency) - X[:, BASE_COLUMN], and the exported graph adds
# that column back (unclipped).  A backend observed at 60 ms is then predicted
# near 60 ms x (what load, errors and trends do to it) even when no backend in
# the training trace was that slow: the scale comes from the observation, the
# network supplies how it moves.
BASE_COLUMN = FEATURES.index("lat_ewma_log")


def targets(latency: np.ndarray, ok: np.ndarray, X: np.ndarray) -> np.ndarray:
    y = np.empty((len(latency), 2), dtype=np.float64)
    y[:, 0] = np.log(np.maximum(latency.astype(np.float64), MIN_LATENCY)) - X[:, BASE_COLUMN]
    y[:, 1] = (~ok.astype(bool)).astype(np.float64)
    return y


def fit(data: dict[str, np.ndarray], seed: int = 0, max_iter: int = 200) -> bytes:
    """Fit on trace columns; returns the ONNX model as bytes."""
    pipe, X, version = fit_pipeline(data, seed, max_iter)
    return export(pipe, version, X.min(axis=0), X.max(axis=0))


def fit_pipeline(data: dict[str, np.ndarray], seed: int = 0, max_iter: int = 200):
    """The fitted scikit-learn pipeline, the training matrix and the version string."""
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(data["features"], dtype=np.float32)[-MAX_RECORDS:]
    lat, ok = data["latency"][-MAX_RECORDS:], data["ok"][-MAX_RECORDS:]
    if X.ndim != 2 or X.shape[1] != N_FEATURES:
        raise TrainError(f"features have shape {X.shape}, expected (n, {N_FEATURES})")
    if len(X) < MIN_RECORDS:
        raise TrainError(f"too few trace records ({len(X)}); at least {MIN_RECORDS} are needed")
    finite = np.isfinite(X).all(axis=1) & np.isfinite(lat)
    X, lat, ok = X[finite], lat[finite], ok[finite]
    if len(X) < MIN_RECORDS:
        raise TrainError(f"too few valid trace records ({len(X)}); at least {MIN_RECORDS} are needed")
    y = targets(lat, ok, X)
    mlp = MLPRegressor(hidden_layer_sizes=HIDDEN, activation="relu", alpha=ALPHA, learning_rate_init=2e-3,
                       batch_size=min(256, len(X)), max_iter=max_iter, early_stopping=len(X) >= 500,
                       n_iter_no_change=15, random_state=seed, shuffle=True)
    pipe = make_pipeline(StandardScaler(), mlp)
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(X, y)
    h = hashlib.sha256()
    h.update(X.tobytes())
    h.update(y.tobytes())
    h.update(repr((seed, HIDDEN, max_iter, ALPHA)).encode())
    version = f"mlp-{len(X)}-{h.hexdigest()[:10]}"
    return pipe, X, version


def export(pipe, version: str, lo: np.ndarray, hi: np.ndarray) -> bytes:
    """skl2onnx conversion + inputs clipped to [lo, hi] + the `latency` / `error`
    outputs + metadata.

    Clipping every feature to the range seen in training keeps the network from
    extrapolating wildly on inputs it never saw (a queue of 25 s when training
    saw 1 s): out-of-range inputs are scored as the edge of the known range."""
    import onnx
    from onnx import TensorProto, helper
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    onx = convert_sklearn(_fold_scaler(pipe), initial_types=[("X", FloatTensorType([None, N_FEATURES]))],
                          target_opset={"": 15, "ai.onnx.ml": 3})
    g = onx.graph
    _fuse_gemm(g)
    _flush_denormals(g)
    g.name = f"lb-{version}"  # skl2onnx names it with a random uuid: same fit, same bytes
    raw = g.output[0].name  # (n, 2): ln(latency), failure
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == "X":
                node.input[i] = "lb_X_clipped"
    clip = [helper.make_node("Max", ["X", "lb_lo"], ["lb_X_low"]),
            helper.make_node("Min", ["lb_X_low", "lb_hi"], ["lb_X_clipped"])]
    for i, node in enumerate(clip):
        g.node.insert(i, node)
    g.initializer.extend([
        helper.make_tensor("lb_lo", TensorProto.FLOAT, [N_FEATURES], np.asarray(lo, np.float32).tolist()),
        helper.make_tensor("lb_hi", TensorProto.FLOAT, [N_FEATURES], np.asarray(hi, np.float32).tolist()),
        helper.make_tensor("lb_shape2", TensorProto.INT64, [2], [-1, 2]),
        helper.make_tensor("lb_idx0", TensorProto.INT64, [], [0]),
        helper.make_tensor("lb_idx1", TensorProto.INT64, [], [1]),
        helper.make_tensor("lb_base", TensorProto.INT64, [], [BASE_COLUMN]),
        helper.make_tensor("lb_zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("lb_one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("lb_loglo", TensorProto.FLOAT, [], [float(np.log(1e-5))]),
        helper.make_tensor("lb_loghi", TensorProto.FLOAT, [], [float(np.log(60.0))]),
    ])
    g.node.extend([
        # skl2onnx reshapes a regressor's output to (-1, 1); bring back the two columns
        helper.make_node("Reshape", [raw, "lb_shape2"], ["lb_raw2"]),
        helper.make_node("Gather", ["lb_raw2", "lb_idx0"], ["lb_resid"], axis=1),
        # + the cell's own recent mean (BASE_COLUMN of the unclipped input)
        helper.make_node("Gather", ["X", "lb_base"], ["lb_base_col"], axis=1),
        helper.make_node("Add", ["lb_resid", "lb_base_col"], ["lb_loglat"]),
        helper.make_node("Clip", ["lb_loglat", "lb_loglo", "lb_loghi"], ["lb_loglat_c"]),
        helper.make_node("Exp", ["lb_loglat_c"], ["latency"]),
        helper.make_node("Gather", ["lb_raw2", "lb_idx1"], ["lb_err"], axis=1),
        helper.make_node("Clip", ["lb_err", "lb_zero", "lb_one"], ["error"]),
    ])
    del g.output[:]
    g.output.extend([
        helper.make_tensor_value_info("latency", TensorProto.FLOAT, [None]),
        helper.make_tensor_value_info("error", TensorProto.FLOAT, [None]),
    ])
    del onx.metadata_props[:]
    for k, v in ((META_FEATURES, ",".join(FEATURES)), (META_VERSION, version)):
        p = onx.metadata_props.add()
        p.key, p.value = k, v
    onx.producer_name = "lb train"
    onnx.checker.check_model(onx)
    return onx.SerializeToString()


def _fold_scaler(pipe):
    """The network alone, with the StandardScaler folded into its first layer:
    ((x - mean) / scale) @ W + b  ==  x @ (W / scale) + (b - (mean / scale) @ W).
    One affine op less per scoring call (the ONNX Scaler op is as slow as a layer)."""
    import copy

    scaler, mlp = pipe.steps[0][1], copy.deepcopy(pipe.steps[-1][1])
    W = mlp.coefs_[0]
    mlp.coefs_[0] = W / scaler.scale_[:, None]
    mlp.intercepts_[0] = mlp.intercepts_[0] - (scaler.mean_ / scaler.scale_) @ W
    return mlp


def _flush_denormals(g) -> None:
    """Weights below float32's smallest normal number -> 0.  L2 regularisation
    drives the weights of features that carry nothing (constant in training)
    towards zero, into the subnormal range, where x86 CPUs compute through a
    slow microcode path: 37 such weights in the shipped model (36 in its first
    layer) made scoring 1,000 x 8 rows take 2.0-2.1 ms instead of 0.49-0.50
    ms on an Intel Xeon, for the same outputs."""
    from onnx import numpy_helper

    tiny = np.finfo(np.float32).tiny
    for t in g.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and ((a != 0) & (np.abs(a) < tiny)).any():
            t.CopyFrom(numpy_helper.from_array(np.where(np.abs(a) < tiny, np.float32(0), a), t.name))


def _fuse_gemm(g) -> None:
    """MatMul + Add(bias initializer) -> one Gemm (onnxruntime does not fuse these here)."""
    from onnx import helper

    inits = {i.name for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = []
    drop = set()
    for n in g.node:
        if id(n) in drop:
            continue
        users = consumers.get(n.output[0], []) if n.op_type == "MatMul" else []
        if len(users) == 1 and users[0].op_type == "Add":
            add = users[0]
            bias = [i for i in add.input if i != n.output[0]]
            if len(bias) == 1 and bias[0] in inits and n.input[1] in inits:
                out.append(helper.make_node("Gemm", [n.input[0], n.input[1], bias[0]], list(add.output)))
                drop.add(id(add))
                continue
        out.append(n)
    del g.node[:]
    g.node.extend(out)


# -- challenger vs live ----------------------------------------------------------------------------


def score(model: Model, heldout: dict[str, np.ndarray]) -> float:
    """Loss on held-out records (lower is better): mean |ln(observed / predicted)|
    of the latency + ERROR_WEIGHT x Brier score of the error probability."""
    lat, err = model.predict(np.asarray(heldout["features"], dtype=np.float32))
    obs = np.maximum(heldout["latency"].astype(np.float64), MIN_LATENCY)
    fail = (~heldout["ok"].astype(bool)).astype(np.float64)
    return float(np.mean(np.abs(np.log(obs / lat))) + ERROR_WEIGHT * np.mean((err - fail) ** 2))


def evaluate_challenger(live: Model | None, challenger: Model, heldout: dict[str, np.ndarray]) -> bool:
    """True if `challenger` should replace `live`: better by SWAP_MARGIN on `heldout`."""
    if len(heldout["latency"]) == 0:
        return False
    if live is None:
        return True
    return score(challenger, heldout) < score(live, heldout) * (1.0 - SWAP_MARGIN)


def split_recent(data: dict[str, np.ndarray], share: float = 0.2) -> tuple[dict, dict]:
    """(older part for fitting, most recent `share` held out); data is time-ordered."""
    n = len(data["latency"])
    cut = n - max(1, int(n * share))
    return {k: v[:cut] for k, v in data.items()}, {k: v[cut:] for k, v in data.items()}


# -- command line ----------------------------------------------------------------------------------


def cmd_train(args) -> int:
    """`lb train PATH... -o model.onnx [--seed N]`."""
    try:
        data = read(args.paths)
        blob = fit(data, seed=args.seed, max_iter=args.max_iter)
    except (TraceError, TrainError) as exc:
        print(f"lb train: {exc}", file=sys.stderr)
        return 2
    out = args.output
    try:
        tmp = out + ".tmp"
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, out)
    except OSError as exc:
        print(f"lb train: {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    model = Model.from_bytes(blob, out)
    s = score(model, data)
    print(f"{out}: {len(data['latency'])} records, version {model.version}, "
          f"training loss {s:.3f}")
    return 0
