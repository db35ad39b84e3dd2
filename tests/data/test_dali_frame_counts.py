"""No padding frames from DALI: the boundary between the frames a container header promises and the
frames its stream decodes, on CPU with real VP9 files (DALI's CPU decoder), and NVDEC's minimum sizes.

The "edit list" video is VP9 in MP4 whose first 2 packets have negative timestamps: the MP4 muxer
writes an edit list that marks them discard, so the header counts 10 frames, every decoder outputs 8,
and DALI 2.4 returns two blank frames for the clip plan's frames 8 and 9 whatever its pad_mode.
"""
from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from conftest import video_loader
from tsm_dist.data.augment import MEAN, STD
from tsm_dist.data.clips import ClipSpec
from tsm_dist.data.dali_loader import PAD_MODE, StreamFacts, _build_pipeline, _feed, check_clip, stream_facts
from tsm_dist.data.encode import write_video
from tsm_dist.data.errors import VideoError
from tsm_dist.data.filelist import VideoRecord
from tsm_dist.data.pack.format import ByteReader
from tsm_dist.data.probe import probe_video

FRAMES, HIDDEN, SIZE = 10, 2, 64


def _level(k: int) -> int:
    return 10 + 20 * k


def _frames() -> np.ndarray:
    levels = np.array([_level(k) for k in range(FRAMES)], dtype=np.uint8)
    return np.ascontiguousarray(np.broadcast_to(levels[:, None, None, None], (FRAMES, SIZE, SIZE, 3)))


def _write_edit_list_mp4(path: str) -> None:
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libvpx-vp9", rate=12)
        stream.height = stream.width = SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0", "crf": "4", "b": "0"}
        packets = [p for f in _frames() for p in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24"))]
        for packet in packets + list(stream.encode()):
            packet.pts -= HIDDEN  # in the encoder's time base, 1/12 s: HIDDEN frames before time 0
            packet.dts -= HIDDEN
            container.mux(packet)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("frame_counts")
    _write_edit_list_mp4(str(root / "edit_list.mp4"))
    write_video(str(root / "plain.webm"), _frames(), quality=4)
    return root


def _levels(clips: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(MEAN).view(3, 1, 1) * 255, torch.tensor(STD).view(3, 1, 1) * 255
    return (clips * std + mean).mean(dim=(-3, -2, -1)).numpy()


def _loader(root, names, **kw):
    records = [VideoRecord(n, 0, where=f"list.txt:{i + 1}") for i, n in enumerate(names)]
    options = dict(backend="dali", device="cpu", num_frames=FRAMES, sampling="dense", stride=1, batch_size=1,
                   train=False, num_threads=1)
    return video_loader(records, root, **{**options, **kw})


def test_the_header_promises_frames_the_stream_does_not_decode(videos):
    path = str(videos / "edit_list.mp4")
    assert probe_video(path).num_frames == FRAMES  # what the clip plan counts
    facts = stream_facts(np.fromfile(path, dtype=np.uint8))
    assert (facts.frames, facts.codec, facts.width) == (FRAMES - HIDDEN, "vp9", SIZE)
    with av.open(path) as container:  # and what a decoder outputs
        assert sum(1 for _ in container.decode(video=0)) == FRAMES - HIDDEN
    plain = str(videos / "plain.webm")
    assert stream_facts(np.fromfile(plain, dtype=np.uint8)).frames == probe_video(plain).num_frames == FRAMES


def test_a_clip_past_the_decodable_frames_fails_naming_the_video(videos):
    loader = _loader(videos, ["edit_list.mp4"])  # dense 10 frames: the plan asks for frames 0..9
    with pytest.raises(VideoError) as err:
        list(loader)
    assert str(videos / "edit_list.mp4") in str(err.value) and "list.txt:1" in str(err.value)
    assert "decodes only 8 frames" in str(err.value) and "frame 9 is planned" in str(err.value)


def test_loop_does_not_hide_missing_frames_either(videos):
    """short_videos='loop' repeats frames of a video shorter than a clip, counted by the plan; frames the
    container counts but no decoder outputs are an error as with the PyAV backend, not repeated ones."""
    with pytest.raises(VideoError, match="decodes only 8 frames"):
        list(_loader(videos, ["edit_list.mp4"], short_videos="loop"))
    with pytest.raises(VideoError, match="decoded only 8 frames"):
        list(_loader(videos, ["edit_list.mp4"], backend="pyav", short_videos="loop"))


def test_skip_corrupt_skips_the_video_and_reports_it(videos):
    loader = _loader(videos, ["edit_list.mp4", "plain.webm"], skip_corrupt=True, batch_size=2)
    (clips, labels), = list(loader)
    assert labels.tolist() == [-1, 0]  # evaluation: the skipped slot is padding, the other video is intact
    assert np.allclose(_levels(clips[1]), [_level(k) for k in range(FRAMES)], atol=3)
    assert [path for path, _ in loader.skipped] == [str(videos / "edit_list.mp4")]


def test_the_decoder_never_pads_a_frame_past_its_own_count(videos):
    """The decoder argument itself: pad_mode 'none' turns a frame past DALI's count into an error
    (DALI's default 'constant' returns a black frame)."""
    path = str(videos / "plain.webm")
    spec = ClipSpec(path, "", 0, np.arange(FRAMES + 1, dtype=np.int32), ((0, 0, SIZE, SIZE),), False)
    fed = iter([_feed([spec], 1, ByteReader())])
    pipe = _build_pipeline(lambda: next(fed), decode_device="cpu", num_crops=1, crop_size=32, batch_size=1,
                           num_threads=1, device_id=None)
    assert PAD_MODE == "none"
    with pytest.raises(RuntimeError, match="out-of-bounds|out of bounds|pad_mode"):
        pipe.run()


@pytest.mark.parametrize("codec,size,nvdec,ok", [("vp9", 64, True, False), ("vp9", 128, True, True),
                                                  ("h264", 64, True, True), ("hevc", 128, True, False),
                                                  ("vp9", 64, False, True)])
def test_nvdec_minimum_frame_sizes(codec, size, nvdec, ok):
    spec = ClipSpec("v.mp4", "list.txt:3", 0, np.arange(4, dtype=np.int32), ((0, 0, size, size),), False)
    facts = StreamFacts(10, codec, size, size)
    if ok:
        assert check_clip(spec, facts, nvdec=nvdec) is spec
    else:
        with pytest.raises(VideoError, match=f"below NVDEC's minimum .* {codec}|below NVDEC's minimum"):
            check_clip(spec, facts, nvdec=nvdec)


@pytest.mark.parametrize("size,ok", [(64, False), (128, True)])
def test_synthetic_set_meets_nvdec_minimum_only_from_size_128(tmp_path, size, ok):
    from tsm_dist.data.synthetic import NVDEC_MIN_VP9, make_synthetic

    made = make_synthetic(str(tmp_path), videos_per_class=2, frames=4, size=size)
    path = str(tmp_path / open(made.train_list).readline().split()[0])
    facts = stream_facts(np.fromfile(path, dtype=np.uint8))
    spec = ClipSpec(path, "train.txt:1", 0, np.arange(4, dtype=np.int32), ((0, 0, size, size),), False)
    assert NVDEC_MIN_VP9 == 128 and facts.codec == "vp9" and facts.width == size
    if ok:
        assert check_clip(spec, facts, nvdec=True) is spec
    else:
        with pytest.raises(VideoError, match="make-synthetic --size 128"):
            check_clip(spec, facts, nvdec=True)
