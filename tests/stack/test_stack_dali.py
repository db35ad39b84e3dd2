"""DALI's CPU video decoding is real: a VP9 file written here by PyAV decodes to the frames we wrote."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
dali = pytest.importorskip("nvidia.dali")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402

FRAMES, H, W, BAR = 20, 48, 64, 8


def bar_left_edge(t: int) -> int:
    return 2 * t


def write_vp9(path: Path) -> None:
    """A white vertical bar moving right by 2 pixels per frame on black."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for t in range(FRAMES):
            img = np.zeros((H, W, 3), np.uint8)
            img[:, bar_left_edge(t):bar_left_edge(t) + BAR] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def check_frames(frames: np.ndarray) -> None:
    assert frames.shape == (FRAMES, H, W, 3) and frames.dtype == np.uint8
    for t in range(FRAMES):
        bright = np.flatnonzero(frames[t, H // 2, :, 0] > 128)
        # Lossy coding blurs edges by a pixel at most; the bar must be where we drew it.
        assert abs(int(bright[0]) - bar_left_edge(t)) <= 1 and abs(len(bright) - BAR) <= 2, (t, bright)


@pytest.fixture(scope="module")
def vp9_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dali") / "bar.webm"
    write_vp9(path)
    return path


def test_dali_cpu_reader_decodes_vp9(vp9_file):
    @pipeline_def(batch_size=1, num_threads=2, device_id=None)
    def pipe():
        return fn.experimental.readers.video(filenames=[str(vp9_file)], sequence_length=FRAMES, device="cpu")

    p = pipe()
    p.build()
    (frames,) = p.run()
    check_frames(np.asarray(frames[0]))


def test_dali_cpu_decoder_decodes_vp9_bytes(vp9_file):
    @pipeline_def(batch_size=1, num_threads=2, device_id=None)
    def pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        return fn.decoders.video(encoded, device="cpu")

    p = pipe()
    p.build()
    p.feed_input("encoded", [np.fromfile(vp9_file, dtype=np.uint8)])
    (frames,) = p.run()
    check_frames(np.asarray(frames[0]))
