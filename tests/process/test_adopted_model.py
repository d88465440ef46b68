"""A model adopted by continuous learning survives a reload (which restarts the
inference process), and gives way when the operator configures another model.

The refit itself is inference/retrain.py's (tests/process/test_train.py); here the
inference process's copy of an adopted model is put in place with
inference.adopted.save, as the process does after a swap, and lb is reloaded."""

from __future__ import annotations

import shutil
import signal
import tempfile

from inference import adopted
from inference.model import DEFAULT_MODEL
from tests.models import constant_model


def reload(lb, n: int) -> None:
    lb.proc.send_signal(signal.SIGHUP)
    lb.log.wait_for("reload_done", n, timeout=20)
    lb.log.wait_for("inference_ready", n + 1, timeout=20)


def test_adopted_model_survives_a_reload_until_another_model_is_configured(lb_factory, backend_factory, tmp_path):
    rd = tempfile.mkdtemp(prefix="lbr-", dir="/tmp")  # ipc paths must stay short
    try:
        b = backend_factory("a")
        lb = lb_factory([b], strategy="ml", extra=f'runtime_dir = "{rd}"')
        lb.log.wait_for("inference_ready", timeout=20)
        assert not lb.log.events("model_restored")
        learned = constant_model(tmp_path / "refit.onnx", 0.005, 0.0, version="refit-1")
        adopted.save(rd, learned, adopted.base_model("", DEFAULT_MODEL), "refit-1")

        reload(lb, 1)  # the new inference process starts from the adopted model
        restored = lb.log.events("model_restored")
        assert [e["version"] for e in restored] == ["refit-1"], lb.log.lines[-20:]

        other = constant_model(tmp_path / "other.onnx", 0.005, 0.0, version="configured-2")
        text = lb.config.read_text().replace("[admin]", f'[learning]\nmodel = "{other}"\n[admin]', 1)
        lb.config.write_text(text)
        reload(lb, 2)  # another base model configured: the adopted one does not apply
        assert len(lb.log.events("model_restored")) == 1
        assert lb.log.events("model_loaded")[-1]["version"] == "configured-2"
    finally:
        shutil.rmtree(rd, ignore_errors=True)
