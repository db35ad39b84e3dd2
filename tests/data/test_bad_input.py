"""Bad input gives errors naming the video and its list line; skip_corrupt skips and counts it."""
from __future__ import annotations

import functools

import av
import numpy as np
import pytest
import torch

from conftest import video_loader
from tsm_dist.data.dali_loader import DaliLoader
from tsm_dist.data.encode import write_video
from tsm_dist.data.errors import DataError, FileListError, VideoError
from tsm_dist.data.filelist import read_file_list
from tsm_dist.data.clips import ClipOptions, ClipPlanner

BACKENDS = ["dali", "pyav"]
needs_x264 = pytest.mark.skipif(
    "libx264" not in av.codecs_available, reason="PyAV's FFmpeg has no libx264 encoder to write the H.264 test file"
)


def _frames(count: int) -> np.ndarray:
    rng = np.random.default_rng(count)
    return rng.integers(0, 255, (count, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """good0..good3 (VP9, 12 frames), short (3 frames), empty, corrupt, h264 (if possible)."""
    root = tmp_path_factory.mktemp("bad")
    for i in range(4):
        write_video(str(root / f"good{i}.webm"), _frames(12))
    write_video(str(root / "short.webm"), _frames(3))
    (root / "empty.webm").write_bytes(b"")
    (root / "corrupt.webm").write_bytes(b"\x1aE\xdf\xa3" + np.random.default_rng(0).bytes(3000))
    if "libx264" in av.codecs_available:
        write_video(str(root / "h264.mp4"), _frames(12), codec="libx264")
    return root


def _list(root, names: list[str], labels: list[int] | None = None) -> str:
    labels = labels or [i % 2 for i in range(len(names))]
    path = root / f"list_{abs(hash(tuple(names)))}.txt"
    path.write_text("".join(f"{n} {l}\n" for n, l in zip(names, labels)))
    return str(path)


_loader = functools.partial(video_loader, batch_size=2, crop_size=16, num_classes=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name, reason",
    [
        ("missing.webm", "file not found"),
        ("empty.webm", "file is empty"),
        ("corrupt.webm", "not a readable video"),
        ("short.webm", "video has 3 usable frames, segment sampling of 8 frames (stride 1) needs 8"),
    ],
)
def test_bad_video_names_file_and_line(videos, backend, name, reason):
    file_list = _list(videos, ["good0.webm", name])
    with pytest.raises(VideoError) as err:
        list(_loader(file_list, videos, backend=backend, batch_size=2))
    message = str(err.value)
    assert str(videos / name) in message and f"{file_list}:2" in message and reason in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_videos_can_loop(videos, backend):
    file_list = _list(videos, ["short.webm", "good0.webm"])
    clips, labels = next(iter(_loader(file_list, videos, backend=backend, short_videos="loop", train=False)))
    assert clips.shape == (2, 8, 3, 16, 16) and labels.tolist() == [0, 1]


def test_label_outside_the_classes_names_the_line(videos):
    file_list = _list(videos, ["good0.webm", "good1.webm"], labels=[1, 2])
    with pytest.raises(FileListError, match=rf"{file_list}:2: label 2 of good1.webm is outside the classes \[0, 2\)"):
        _loader(file_list, videos, backend="pyav")


@needs_x264
def test_h264_on_dali_cpu_names_the_file_and_suggests_pyav(videos):
    file_list = _list(videos, ["good0.webm", "h264.mp4"])
    with pytest.raises(VideoError) as err:
        list(_loader(file_list, videos, backend="dali"))
    message = str(err.value)
    assert str(videos / "h264.mp4") in message and f"{file_list}:2" in message
    assert "codec h264" in message and "backend='pyav'" in message and "transcode" in message
    clips, labels = next(iter(_loader(file_list, videos, backend="pyav", train=False)))  # the fallback reads it
    assert clips.shape == (2, 8, 3, 16, 16) and labels.tolist() == [0, 1]


@needs_x264
def test_dali_decode_failure_is_traced_to_the_file(videos):
    """Without the up-front codec check DALI itself fails; the loader finds and names the culprit."""
    records, _ = read_file_list(_list(videos, ["good0.webm", "h264.mp4", "good1.webm", "good2.webm"]))
    options = ClipOptions(num_frames=8, crop_size=16, train=True)

    def loader(skip: bool) -> DaliLoader:
        planner = ClipPlanner(records, str(videos), options, batch_size=2, skip_corrupt=skip)
        return DaliLoader(planner, check_codecs=False)

    with pytest.raises(VideoError, match=r"h264\.mp4 \(listed at .*:2\): DALI cannot decode the video"):
        for _ in loader(skip=False):
            pass
    skipping = loader(skip=True)
    batches = list(skipping)
    assert len(batches) == 2 and all(l.shape == (2,) and (l >= 0).all() for _, l in batches)
    assert [path for path, _ in skipping.skipped] == [str(videos / "h264.mp4")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_corrupt_skips_counts_and_keeps_batch_counts(videos, backend):
    names = ["good0.webm", "missing.webm", "good1.webm", "empty.webm", "corrupt.webm", "good2.webm", "short.webm",
             "good3.webm", "missing.webm", "good0.webm"]
    labels = [0, 1, 1, 0, 1, 0, 1, 1, 0, 7]  # the last line's label is outside the 2 classes
    file_list = _list(videos, names, labels)
    train = _loader(file_list, videos, backend=backend, skip_corrupt=True, batch_size=3)
    assert len(train) == 3  # 9 parsed lines / batch 3; the bad label line is skipped at parse time
    batches = list(train)
    assert len(batches) == 3 and all(l.shape == (3,) and (l >= 0).all() for _, l in batches)
    reasons = dict(train.skipped)
    assert len(train.skipped) == 5  # missing.webm, listed twice, is reported once
    assert {str(videos / n) for n in ("missing.webm", "empty.webm", "corrupt.webm", "short.webm")} <= set(reasons)
    assert any("label 7" in r for r in reasons.values())
    list(train)  # a second epoch does not count the same files again
    assert len(train.skipped) == 5

    evaluation = _loader(file_list, videos, backend=backend, skip_corrupt=True, batch_size=3, train=False)
    labels_seen = torch.cat([l for _, l in evaluation])
    assert labels_seen.tolist() == [0, -1, 1, -1, -1, 0, -1, 1, -1]  # bad videos: label -1
    assert len(evaluation.skipped) == 5


def test_all_videos_bad_is_an_error(videos):
    file_list = _list(videos, ["missing.webm", "empty.webm"])
    with pytest.raises(DataError, match="no usable video"):
        list(_loader(file_list, videos, backend="pyav", skip_corrupt=True))
