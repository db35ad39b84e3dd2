"""An exported online model streaming in onnxruntime: the caches live here, between calls.

:class:`OnnxStream` reads the sidecar for the cache names and shapes, starts every stream at zero
caches and feeds each call's new caches to the next. It is all a deployment needs besides the
preprocessing (deploy/frames.py); any other runtime does the same with the names in the sidecar.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tsm_dist.commands.exit_codes import UsageError
from tsm_dist.deploy.export import read_sidecar
from tsm_dist.deploy.runtime import session


class OnnxStream:
    """``stream(frame)``, ``frame`` ``(N, 3, H, W)`` float32 normalised -> logits ``(N, classes)``."""

    def __init__(self, model_path: str | Path, threads: int = 0) -> None:
        self.meta = read_sidecar(model_path)
        if self.meta.get("mode") != "online" or self.meta.get("format") != "onnx":
            raise UsageError(f"{model_path} is an {self.meta.get('mode')} {self.meta.get('format')} export; "
                             "streaming needs `tsm-dist export --format onnx --mode online`")
        self.session = session(model_path, threads)
        self.caches_meta = self.meta["caches"]
        self.caches: dict[str, np.ndarray] | None = None

    def reset(self) -> None:
        self.caches = None

    def cache_nbytes(self) -> int:
        return 0 if self.caches is None else sum(c.nbytes for c in self.caches.values())

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        frame = np.ascontiguousarray(frame, dtype=np.float32)
        if self.caches is None:
            self.caches = {c["input"]: np.zeros((frame.shape[0], *c["shape"][1:]), np.float32)
                           for c in self.caches_meta}
        names = ["logits", *[c["output"] for c in self.caches_meta]]
        outputs = self.session.run(names, {"frame": frame, **self.caches})
        self.caches = {c["input"]: out for c, out in zip(self.caches_meta, outputs[1:])}
        return outputs[0]
