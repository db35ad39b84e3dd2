"""An onnxruntime CPU session for an exported model, with one line for a file it cannot load.

Streaming an online export (the caches carried between calls) is :class:`tsm_dist.streaming.onnx_stream.OnnxStream`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tsm_dist.commands.exit_codes import CheckpointError


def session(model_path: str | Path, threads: int = 0) -> Any:
    """An onnxruntime CPU session (``threads`` intra-op threads; 0: onnxruntime's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own types (InvalidProtobuf, NoSuchFile, Fail, ...)
        text = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"model {model_path} cannot be loaded by onnxruntime ({type(exc).__name__}: "
                              f"{text}); export it again with `tsm-dist export`") from None
