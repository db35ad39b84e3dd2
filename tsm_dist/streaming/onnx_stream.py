"""An exported online model streaming in onnxruntime: the caches live here, between calls.

:class:`OnnxStream` reads the sidecar for the cache names and shapes, starts every stream at zero
caches and feeds each call's new caches to the next. It is all a deployment needs besides the
preprocessing (deploy/frames.py); any other runtime does the same with the names in the sidecar.

The caches stay in onnxruntime's hands between calls (:class:`BoundStep`): two sets of buffers
allocated once, bound to the session's cache inputs and outputs (IOBinding), swapped every frame. A
plain ``session.run`` with numpy feeds would wrap every cache as a new input and allocate and copy
every new cache as a numpy output, on each frame (docs/deploy.md has what that costs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tsm_dist.commands.exit_codes import UsageError
from tsm_dist.deploy.export import read_sidecar
from tsm_dist.deploy.runtime import session


class BoundStep:
    """``step(frame) -> logits`` of one session, inputs and outputs bound to buffers allocated once.

    ``caches`` pairs each cache input with the output that feeds it next (the sidecar's ``caches``:
    ``input``, ``output``, ``shape``; empty for a graph without caches, e.g. the 2D network). Frame t
    reads its caches from one set of buffers and writes the new ones into the other; frame t+1 swaps
    them (ping-pong), so a cache is never copied. The batch size is fixed at construction.
    """

    def __init__(self, sess: Any, caches: list[dict], batch: int, input_name: str = "frame",
                 output_name: str = "logits") -> None:
        from onnxruntime import OrtValue

        self.session, self.input_name = sess, input_name
        out = next(o for o in sess.get_outputs() if o.name == output_name)
        self.logits = np.zeros((batch, int(out.shape[-1])), np.float32)
        self.buffers = [[np.zeros((batch, *c["shape"][1:]), np.float32) for c in caches] for _ in range(2)]
        self.bindings = []
        for parity in (0, 1):
            binding = sess.io_binding()
            binding.bind_ortvalue_output(output_name, OrtValue.ortvalue_from_numpy(self.logits))
            for c, current, new in zip(caches, self.buffers[parity], self.buffers[1 - parity]):
                binding.bind_ortvalue_input(c["input"], OrtValue.ortvalue_from_numpy(current))
                binding.bind_ortvalue_output(c["output"], OrtValue.ortvalue_from_numpy(new))
            self.bindings.append(binding)
        self.parity = 0

    def reset(self) -> None:
        """Zero caches: the next frame starts a new stream."""
        for buffer in self.buffers[self.parity]:
            buffer.fill(0.0)

    def current_caches(self) -> list[np.ndarray]:
        """The caches the next frame reads (views of the bound buffers)."""
        return self.buffers[self.parity]

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        binding = self.bindings[self.parity]
        # bound per call, not copied: the frame's own memory is the input
        binding.bind_cpu_input(self.input_name, frame)
        self.session.run_with_iobinding(binding)
        self.parity ^= 1
        return self.logits.copy()


class OnnxStream:
    """``stream(frame)``, ``frame`` ``(N, 3, H, W)`` float32 normalised -> logits ``(N, classes)``."""

    def __init__(self, model_path: str | Path, threads: int = 0) -> None:
        self.meta = read_sidecar(model_path)
        if self.meta.get("mode") != "online" or self.meta.get("format") != "onnx":
            raise UsageError(f"{model_path} is an {self.meta.get('mode')} {self.meta.get('format')} export; "
                             "streaming needs `tsm-dist export --format onnx --mode online`")
        self.session = session(model_path, threads)
        self.caches_meta = self.meta["caches"]
        self.step: BoundStep | None = None
        self.started = False

    def reset(self) -> None:
        self.started = False

    def cache_nbytes(self) -> int:
        """Bytes of cache one call reads (the state carried per stream; 0 before the first frame)."""
        if self.step is None or not self.started:
            return 0
        return sum(c.nbytes for c in self.step.current_caches())

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        frame = np.ascontiguousarray(frame, dtype=np.float32)
        if self.step is None or self.step.logits.shape[0] != frame.shape[0]:
            self.step = BoundStep(self.session, self.caches_meta, frame.shape[0])
            self.started = False
        if not self.started:
            self.step.reset()
            self.started = True
        return self.step(frame)
