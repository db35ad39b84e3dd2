"""Frame sampling, sharding with padding, crop planning and the flip label map (no decoding)."""
from __future__ import annotations

import numpy as np
import pytest

from tsm_dist.data.augment import (
    eval_crop_boxes,
    left_right_swap_map,
    multiscale_crop_box,
    random_resized_crop_box,
)
from tsm_dist.data.sampling import dense_indices, frames_needed, segment_indices
from tsm_dist.data.sharding import PAD, batches_per_epoch, shard_slots


def test_segment_sampling_takes_one_frame_per_segment():
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = segment_indices(40, 8, train=True, rng=rng)
        assert idx.shape == (8,)
        assert all(5 * i <= f < 5 * (i + 1) for i, f in enumerate(idx))
    assert segment_indices(40, 8, train=False).tolist() == [2, 7, 12, 17, 22, 27, 32, 37]
    # two test clips per video: 1/4 and 3/4 into each segment
    assert segment_indices(40, 4, train=False, num_clips=2).tolist() == [2, 12, 22, 32, 7, 17, 27, 37]
    # shorter than the number of segments: frames repeat, stay in range
    assert segment_indices(3, 8, train=False).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    draws = np.stack([segment_indices(40, 8, train=True, rng=rng) for _ in range(200)])
    assert len(np.unique(draws[:, 0])) == 5  # training offsets cover the whole segment


def test_dense_sampling_takes_consecutive_strided_frames():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(100):
        idx = dense_indices(40, 8, 2, train=True, rng=rng)
        assert np.all(np.diff(idx) == 2) and idx[-1] < 40
        starts.add(int(idx[0]))
    assert starts == set(range(0, 40 - 15 + 1))
    assert dense_indices(40, 8, 2, train=False).tolist() == list(range(12, 28, 2))
    three = dense_indices(40, 8, 2, train=False, num_clips=3).reshape(3, 8)
    assert three[:, 0].tolist() == [0, 12, 25] and three[-1, -1] == 39
    assert dense_indices(5, 4, 2, train=False).tolist() == [0, 2, 4, 1]  # loops around
    assert frames_needed("dense", 8, 2) == 15 and frames_needed("segment", 8, 2) == 8


@pytest.mark.parametrize("num_samples, batch_size, num_shards", [(10, 3, 2), (7, 2, 3), (16, 4, 2), (1, 4, 2)])
def test_shards_cover_data_with_equal_batch_counts(num_samples, batch_size, num_shards):
    length = batches_per_epoch(num_samples, batch_size, num_shards)
    for train in (True, False):
        shards = [
            shard_slots(num_samples, batch_size=batch_size, shard_id=k, num_shards=num_shards, train=train,
                        seed=3, epoch=1)
            for k in range(num_shards)
        ]
        assert all(len(s) == length * batch_size for s in shards)
        real = np.concatenate([s[s != PAD] for s in shards])
        assert set(real.tolist()) == set(range(num_samples))
        if not train:  # evaluation: every sample exactly once, the rest is padding
            assert len(real) == num_samples
            assert all(np.all(s[: np.sum(s != PAD)] != PAD) for s in shards)  # padding only at the end
        else:  # training: no padding, wrap-around repeats fill the slots
            assert len(real) == num_shards * length * batch_size


def test_training_order_is_reshuffled_per_epoch_and_reproducible():
    def order(epoch, seed=0):
        return shard_slots(50, batch_size=5, shard_id=0, num_shards=2, train=True, seed=seed, epoch=epoch)

    assert np.array_equal(order(3), order(3))
    assert not np.array_equal(order(3), order(4))
    assert not np.array_equal(order(3), order(3, seed=1))
    with pytest.raises(ValueError, match="shard_id 2"):
        shard_slots(10, batch_size=2, shard_id=2, num_shards=2, train=True)


def test_crop_boxes_stay_inside_the_frame():
    rng = np.random.default_rng(0)
    for _ in range(300):
        for height, width in ((240, 320), (64, 64), (320, 180)):
            for box in (multiscale_crop_box(rng, height, width), random_resized_crop_box(rng, height, width)):
                x0, y0, x1, y1 = box
                assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    w, h = [], []
    for _ in range(300):
        x0, y0, x1, y1 = multiscale_crop_box(rng, 256, 340)
        w.append(x1 - x0)
        h.append(y1 - y0)
    assert set(w) == {256, 224, 192, 168} and max(abs(a - b) for a, b in zip(w, h)) <= 32  # max_distort 1


def test_eval_crops_match_resize_then_crop():
    # a 320x240 video resized to shorter side 256 and cut 224: box side 240 * 224 / 256 = 210
    assert eval_crop_boxes(240, 320, 224, 256, 1) == [(55, 15, 265, 225)]
    assert eval_crop_boxes(240, 320, 224, 256, 3) == [(0, 15, 210, 225), (55, 15, 265, 225), (110, 15, 320, 225)]
    assert eval_crop_boxes(320, 240, 224, 256, 3)[2] == (15, 110, 225, 320)  # portrait: along the height
    with pytest.raises(ValueError, match="num_crops"):
        eval_crop_boxes(240, 320, 224, 256, 5)


def test_left_right_swap_map():
    names = ["Pushing something from left to right", "Pushing something from right to left", "Opening something",
             "Turning left", "turning right"]
    assert left_right_swap_map(names) == {0: 1, 1: 0}
