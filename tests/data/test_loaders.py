"""DALI (CPU) and PyAV loaders on real videos: shapes, normalization, labels, frame indices, shards,
epochs and resuming, multi-view testing, and agreement between the two backends."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import video_loader
from tsm_dist.data.video_loader import build_video_loader
from tsm_dist.data.augment import MEAN, STD
from tsm_dist.data.encode import write_video
from tsm_dist.data.filelist import VideoRecord, read_file_list
from tsm_dist.data.loader import Loader
from tsm_dist.data.synthetic import FLIP_LABEL_MAP

BACKENDS = ["dali", "pyav"]
COUNTER_FRAMES = 40


def _gray_level(k: int) -> int:
    return 4 + 6 * k


def _unnormalize(clips: torch.Tensor) -> torch.Tensor:
    """Back to 0..255 pixel values; channel axis is -3."""
    mean = torch.tensor(MEAN).view(3, 1, 1) * 255
    std = torch.tensor(STD).view(3, 1, 1) * 255
    return clips * std + mean


def _frame_numbers(clips: torch.Tensor) -> np.ndarray:
    """Frame numbers of counter-video clips, read from their gray level: (..., T)."""
    level = _unnormalize(clips).mean(dim=(-3, -2, -1)).numpy()
    return np.round((level - 4) / 6).astype(int)


@pytest.fixture(scope="module")
def counter(tmp_path_factory):
    """Videos whose frame k is uniformly gray at level 4 + 6k (40 frames, 32x48)."""
    root = tmp_path_factory.mktemp("counter")
    levels = np.array([_gray_level(k) for k in range(COUNTER_FRAMES)], dtype=np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (COUNTER_FRAMES, 32, 48, 3))
    records = []
    for i in range(3):
        write_video(str(root / f"c{i}.webm"), np.ascontiguousarray(frames), quality=4)
        records.append(VideoRecord(f"c{i}.webm", i))
    return str(root), records


_loader = video_loader


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_batches_shapes_labels_and_normalization(backend, synthetic):
    loader = _loader(
        synthetic.train_list, synthetic.root, backend=backend, flip_label_map=FLIP_LABEL_MAP, num_classes=4
    )
    records, _ = read_file_list(synthetic.train_list)
    assert isinstance(loader, Loader)  # the contract the trainer uses
    assert len(loader) == 4  # 16 videos / batch 4
    batches = list(loader)
    assert len(batches) == 4
    seen = []
    for b, (clips, labels) in enumerate(batches):
        assert clips.shape == (4, 8, 3, 32, 32) and clips.dtype == torch.float32
        assert labels.shape == (4,) and labels.dtype == torch.int64
        for spec, label in zip(loader.planner.batch(b), labels.tolist()):
            record_label = next(r.label for r in records if spec.path.endswith(r.path))
            assert label == (FLIP_LABEL_MAP[record_label] if spec.flip else record_label)
            seen.append((spec.path, spec.flip))
    assert len({p for p, _ in seen}) == 16  # one epoch sees every video once
    assert any(f for _, f in seen) and not all(f for _, f in seen)
    pixels = _unnormalize(torch.cat([c for c, _ in batches]))
    assert -3 < pixels.min() and pixels.max() < 258 and 40 < pixels.mean() < 200


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_frame_indices_segment_and_dense(backend, counter):
    root, records = counter
    seg = _loader(records, root, backend=backend, train=False, batch_size=3)
    clips, labels = next(iter(seg))
    assert labels.tolist() == [0, 1, 2]
    assert _frame_numbers(clips).tolist() == [[2, 7, 12, 17, 22, 27, 32, 37]] * 3
    normalized = (_gray_level(2) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(clips[0, 0].mean(dim=(1, 2)), normalized, atol=0.05)
    dense = _loader(records, root, backend=backend, train=False, batch_size=3, sampling="dense", stride=2)
    clips, _ = next(iter(dense))
    assert _frame_numbers(clips).tolist() == [list(range(12, 28, 2))] * 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_frame_indices_follow_the_plan(backend, counter):
    root, records = counter
    for sampling in ("segment", "dense"):
        loader = _loader(records, root, backend=backend, sampling=sampling, stride=3, batch_size=3, seed=4)
        clips, _ = next(iter(loader))
        decoded = _frame_numbers(clips)
        planned = np.stack([s.frames for s in loader.planner.batch(0)])
        assert np.array_equal(decoded, planned)
        for row in decoded:
            if sampling == "segment":
                assert all(5 * i <= f < 5 * (i + 1) for i, f in enumerate(row))
            else:
                assert np.all(np.diff(row) == 3)


def test_dali_and_pyav_decode_the_same_clips(synthetic):
    out = {}
    for backend in BACKENDS:
        loader = _loader(synthetic.train_list, synthetic.root, backend=backend, seed=7, flip_label_map=FLIP_LABEL_MAP)
        out[backend] = list(loader)
    for (dali_clips, dali_labels), (pyav_clips, pyav_labels) in zip(out["dali"], out["pyav"]):
        assert torch.equal(dali_labels, pyav_labels)
        assert (dali_clips - pyav_clips).abs().mean() < 0.06  # resize/YUV conversion differ slightly
    eval_out = {}
    for backend in BACKENDS:
        loader = _loader(synthetic.val_list, synthetic.root, backend=backend, train=False, num_clips=2, num_crops=3)
        eval_out[backend] = next(iter(loader))[0]
    assert eval_out["dali"].shape == (4, 6, 8, 3, 32, 32)
    assert (eval_out["dali"] - eval_out["pyav"]).abs().mean() < 0.06
    views = eval_out["dali"][0]
    assert (views[0] - views[2]).abs().mean() > 0.01  # left vs right crop of the first clip differ


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_shards_cover_the_set_disjointly_with_equal_batch_counts(backend, synthetic):
    for train in (False, True):
        shards = [
            _loader(synthetic.train_list, synthetic.root, backend=backend, train=train, batch_size=3,
                    shard_id=k, num_shards=2)
            for k in range(2)
        ]
        assert len(shards[0]) == len(shards[1]) == 3  # ceil(ceil(16 / 2) / 3)
        paths = []
        for loader in shards:
            batches = list(loader)
            assert len(batches) == 3
            labels = torch.cat([l for _, l in batches])
            specs = [s for b in range(len(loader)) for s in loader.planner.batch(b)]
            assert labels.tolist() == [s.label if s else -1 for s in specs]
            paths.append([s.path for s in specs if s is not None])
        if not train:  # evaluation: disjoint, complete, padded with label -1
            assert not set(paths[0]) & set(paths[1])
            assert len(paths[0]) + len(paths[1]) == 16
            assert len(set(paths[0]) | set(paths[1])) == 16
        else:  # training: every video, 2 repeats fill the 18 slots
            assert len(set(paths[0]) | set(paths[1])) == 16 and len(paths[0]) + len(paths[1]) == 18


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_batch_of_padding_only(backend, counter):
    root, records = counter  # 3 videos on 2 shards, batch 1: shard 1 reads video 1, then only padding
    loader = _loader(records, root, backend=backend, train=False, batch_size=1, shard_id=1, num_shards=2)
    batches = list(loader)
    assert [l.tolist() for _, l in batches] == [[1], [-1]]
    assert batches[1][0].shape == (1, 8, 3, 32, 32) and not batches[1][0].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_epochs_reshuffle_and_resume_mid_epoch(backend, synthetic):
    loader = _loader(synthetic.train_list, synthetic.root, backend=backend, seed=3)
    loader.set_epoch(1)
    epoch1 = list(loader)
    loader.set_epoch(2)
    epoch2 = list(loader)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(epoch1, epoch2))
    for clips, _ in loader:  # stopping early and iterating again restarts the epoch
        break
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(epoch2, again))
    fresh = _loader(synthetic.train_list, synthetic.root, backend=backend, seed=3)
    fresh.set_epoch(1, start_batch=2)
    resumed = list(fresh)
    assert len(resumed) == 2
    for (a_clips, a_labels), (b_clips, b_labels) in zip(epoch1[2:], resumed):
        assert torch.equal(a_labels, b_labels) and torch.allclose(a_clips, b_clips)


def test_random_backend():
    loader = build_video_loader(
        None, None, backend="random", num_frames=8, batch_size=4, crop_size=16, train=True,
        num_samples=10, num_classes=5, shard_id=1, num_shards=2,
    )
    assert isinstance(loader, Loader) and loader.skipped == [] and loader.batch_size == 4
    assert len(loader) == 2
    batches = list(loader)
    assert [c.shape for c, _ in batches] == [(4, 8, 3, 16, 16)] * 2
    labels = torch.cat([l for _, l in batches])
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 5
    assert torch.equal(labels, torch.cat([l for _, l in loader]))
    loader.set_epoch(1)
    assert not torch.equal(labels, torch.cat([l for _, l in loader]))
    with pytest.raises(ValueError, match="num_samples and num_classes"):
        build_video_loader(None, None, backend="random", num_frames=8, batch_size=4, crop_size=16, train=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_gpu_device_without_cuda_is_a_clear_error(synthetic):
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        _loader(synthetic.train_list, synthetic.root, backend="dali", device="gpu")
    with pytest.raises(ValueError, match="pyav backend decodes on the CPU"):
        _loader(synthetic.train_list, synthetic.root, backend="pyav", device="gpu")
