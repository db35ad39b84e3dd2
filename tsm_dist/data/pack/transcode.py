"""Transcode a video to VP9 in WebM with a short keyframe interval (``tsm-dist pack --transcode vp9``).

VP9 is what DALI's CPU decoder reads; a short GOP (keyframe every ``gop`` frames) lets decoders seek
close to a planned frame. Frames are streamed (decoded, reformatted to yuv420p, encoded) without
holding the video in memory; odd widths or heights lose their last column or row.
"""
from __future__ import annotations

import av
from av.video.frame import PictureType

from tsm_dist.data.errors import VideoError

TRANSCODES = ("vp9",)


def transcode_vp9(src: str, dst: str, *, gop: int = 16, crf: int = 30, where: str = "") -> int:
    """Write ``src``'s first video stream to ``dst`` as VP9/WebM; return the number of frames written."""
    written = 0
    try:
        with av.open(src) as inp:
            if not inp.streams.video:
                raise VideoError(src, "no video stream in the file", where)
            in_stream = inp.streams.video[0]
            in_stream.thread_type = "AUTO"
            rate = in_stream.average_rate or in_stream.guessed_rate or 25
            width, height = in_stream.codec_context.width // 2 * 2, in_stream.codec_context.height // 2 * 2
            if width <= 0 or height <= 0:
                raise VideoError(src, f"video has no usable frame size ({width}x{height})", where)
            with av.open(dst, "w", format="webm", options={"fflags": "+bitexact"}) as out:
                stream = out.add_stream("libvpx-vp9", rate=rate)
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                stream.thread_count = 1  # parallelism comes from the pack workers
                stream.codec_context.gop_size = gop
                # realtime + lag 0: fast, and no hidden alt-ref frames, so packets == frames.
                stream.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0",
                                  "crf": str(crf), "b": "0", "g": str(gop)}
                for frame in inp.decode(in_stream):
                    frame = frame.reformat(width=width, height=height, format="yuv420p")
                    frame.pts = None
                    frame.pict_type = PictureType.NONE  # an input I-frame must not force a keyframe
                    out.mux(stream.encode(frame))
                    written += 1
                out.mux(stream.encode())
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as err:
        raise VideoError(src, f"transcoding to VP9 failed after {written} frames ({err})", where) from err
    if written == 0:
        raise VideoError(src, "video has no frames", where)
    return written
