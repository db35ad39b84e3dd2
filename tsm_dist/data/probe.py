"""Read a video's frame count, size and codec from its container without decoding it."""
from __future__ import annotations

import os
from dataclasses import dataclass

import av

from tsm_dist.data.errors import VideoError

# What DALI's CPU video decoder accepts; H.264/HEVC/AV1/MPEG-4 need NVDEC (device="gpu").
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg", "libvpx", "libvpx-vp9"})


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    height: int
    width: int
    codec: str


def probe_video(path: str, where: str = "") -> VideoInfo:
    """Raise :class:`VideoError` for a missing, empty or unreadable file or one without frames."""
    if not os.path.exists(path):
        raise VideoError(path, "file not found", where)
    if os.path.getsize(path) == 0:
        raise VideoError(path, "file is empty (0 bytes)", where)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(path, "no video stream in the file", where)
            stream = container.streams.video[0]
            ctx = stream.codec_context
            height, width, codec = ctx.height, ctx.width, ctx.name
            # Matroska/WebM store no frame count; counting packets needs no decoding.
            count = stream.frames or sum(1 for p in container.demux(stream) if p.size)
    except VideoError:
        raise
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as err:
        raise VideoError(path, f"not a readable video ({err})", where) from err
    if count == 0:
        raise VideoError(path, "video has no frames", where)
    if height <= 0 or width <= 0:
        raise VideoError(path, f"video has no frame size ({width}x{height})", where)
    return VideoInfo(count, height, width, codec)
