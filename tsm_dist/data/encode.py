"""Write RGB frames to a video file with PyAV (used by the synthetic set, tests and benchmarks)."""
from __future__ import annotations

import os

import av
import numpy as np

# Container per codec; VP9 in WebM is what DALI's CPU decoder reads.
_FORMATS = {"libvpx-vp9": "webm", "libvpx": "webm", "libx264": "mp4", "mjpeg": "avi"}


def write_video(
    path: str,
    frames: np.ndarray,
    *,
    codec: str = "libvpx-vp9",
    fps: int = 12,
    quality: int = 10,
    gop: int | None = None,
) -> None:
    """Encode ``frames`` (F, H, W, 3) uint8 RGB; H and W must be even. Output is byte-for-byte
    deterministic for the same frames (bit-exact muxing, one encoder thread). ``gop`` is the
    keyframe interval (None: the encoder's default); short intervals let decoders seek to a frame."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if codec not in _FORMATS:
        raise ValueError(f"codec must be one of {sorted(_FORMATS)}, got {codec!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    options = {
        # realtime + lag 0: fast, and no hidden alt-ref frames, so packets == frames.
        "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "crf": str(quality), "b": "0"},
        "libvpx": {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "crf": str(quality), "b": "1M"},
        "libx264": {"preset": "ultrafast", "crf": str(quality)},
        "mjpeg": {},
    }[codec]
    with av.open(path, "w", format=_FORMATS[codec], options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.thread_count = 1
        if gop is not None:
            stream.codec_context.gop_size = gop
        stream.options = options
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
