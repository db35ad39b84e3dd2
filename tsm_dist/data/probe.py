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


def promised_frames(container: "av.container.InputContainer", stream: "av.video.stream.VideoStream") -> tuple[int, bool]:
    """(frames the container's header promises, whether that is an exact count); (0, False) if unknown.

    MP4/AVI headers hold the exact count; Matroska/WebM only a duration, which times the frame rate
    gives an estimate."""
    if stream.frames:
        return int(stream.frames), True
    rate = stream.average_rate or stream.guessed_rate
    if container.duration and rate:
        return int(round(container.duration / 1_000_000 * float(rate))), False
    return 0, False


def is_short(present: int, promised: int, exact: bool) -> bool:
    """Fewer frames than the header promises: below an exact count, or 10 % below an estimate."""
    return bool(promised) and (present < promised if exact else present < 0.9 * promised - 1)


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
            # Matroska/WebM store no frame count; counting packets needs no decoding. ``present`` also
            # counts empty packets with a timestamp (AVI drop frames), not the demuxer's final flush.
            nonempty = present = 0
            for packet in container.demux(stream):
                nonempty += bool(packet.size)
                present += bool(packet.size) or packet.pts is not None
            count = stream.frames or nonempty
            promised, exact = promised_frames(container, stream)
    except VideoError:
        raise
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as err:
        raise VideoError(path, f"not a readable video ({err})", where) from err
    if count == 0:
        raise VideoError(path, "video has no frames", where)
    # Truncated is not short: a file cut off by a failed copy still promises its frames; clips
    # planned from the promise would read frames that are not there (DALI pads them silently).
    if is_short(present, promised, exact):
        raise VideoError(path, f"truncated: the container promises {promised} frames but only {present} are in "
                               f"the file (an interrupted copy or download?)", where)
    if height <= 0 or width <= 0:
        raise VideoError(path, f"video has no frame size ({width}x{height})", where)
    return VideoInfo(count, height, width, codec)
