"""The synthetic temporal-order data set: deterministic, all classes present, frames move, and the
classes differ only in frame order."""
from __future__ import annotations

import os

import numpy as np
import pytest

from tsm_dist.data.filelist import read_class_names, read_file_list
from tsm_dist.data.pyav_loader import decode_frames
from tsm_dist.data.synthetic import CLASSES, FLIP_LABEL_MAP, frame_order, main, make_synthetic, render_scene

FRAMES, SIZE = 12, 32


def _object_x(frames: np.ndarray) -> np.ndarray:
    """x centroid of the bright object (>= 190 in every channel; the background stays below 171)."""
    mask = frames.min(axis=-1) >= 185
    xs = np.arange(frames.shape[2])[None, None, :]
    return (mask * xs).sum(axis=(1, 2)) / np.maximum(mask.sum(axis=(1, 2)), 1)


def _motion_class(x: np.ndarray) -> int:
    """Classify a trajectory by the rule that defines the classes: direction, and one jump or none."""
    steps = np.diff(x)
    rightward = np.median(steps) > 0
    jumps = np.sum(np.abs(steps) > 4 * np.median(np.abs(steps)))
    return (0 if rightward else 1) + (2 if jumps == 1 else 0)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("syn"))
    return make_synthetic(out, videos_per_class=3, frames=FRAMES, size=SIZE, seed=5)


def test_lists_cover_every_class_in_train_and_val(synthetic):
    assert read_class_names(synthetic.classes_file) == list(CLASSES)
    train, _ = read_file_list(synthetic.train_list, num_classes=len(CLASSES))
    val, _ = read_file_list(synthetic.val_list, num_classes=len(CLASSES))
    assert sorted({r.label for r in train}) == sorted({r.label for r in val}) == list(range(len(CLASSES)))
    assert (len(train), len(val)) == (synthetic.num_train, synthetic.num_val) == (8, 4)
    assert not {r.path for r in train} & {r.path for r in val}
    assert all(os.path.getsize(r.resolve(synthetic.root)) > 0 for r in train + val)


def test_generation_is_byte_identical_for_a_seed(synthetic, tmp_path):
    again = make_synthetic(str(tmp_path), videos_per_class=3, frames=FRAMES, size=SIZE, seed=5)
    train, _ = read_file_list(synthetic.train_list)
    for record in train:
        with open(record.resolve(synthetic.root), "rb") as a, open(record.resolve(again.root), "rb") as b:
            assert a.read() == b.read(), record.path
    other = make_synthetic(str(tmp_path / "other"), videos_per_class=3, frames=FRAMES, size=SIZE, seed=6)
    with open(train[0].resolve(synthetic.root), "rb") as a, open(train[0].resolve(other.root), "rb") as b:
        assert a.read() != b.read()


def test_decoded_videos_move_in_the_direction_of_their_class(synthetic):
    train, _ = read_file_list(synthetic.train_list)
    for record in train:
        frames = decode_frames(record.resolve(synthetic.root), np.arange(FRAMES))
        assert frames.shape == (FRAMES, SIZE, SIZE, 3)
        assert np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3)).min() > 0.5  # frames differ
        assert _motion_class(_object_x(frames)) == record.label, record.path
        flipped = frames[:, :, ::-1]
        assert _motion_class(_object_x(flipped)) == FLIP_LABEL_MAP[record.label]


def test_classes_show_the_same_frames_in_different_orders():
    scene = render_scene(np.random.default_rng(1), 16, 48)
    videos = [scene[frame_order(label, 16)] for label in range(len(CLASSES))]
    canonical = sorted(v.tobytes() for v in videos[0])
    for label, video in enumerate(videos):
        assert sorted(f.tobytes() for f in video) == canonical  # same unordered set of frames
        assert _motion_class(_object_x(video)) == label
    assert frame_order(2, 6).tolist() == [0, 2, 4, 1, 3, 5] and frame_order(3, 6).tolist() == [5, 3, 1, 4, 2, 0]
    assert FLIP_LABEL_MAP == {0: 1, 1: 0, 2: 3, 3: 2}


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--videos-per-class", "2", "--frames", "4", "--size", "16", "--seed", "1"]) == 0
    assert "wrote 4 train and 4 val videos" in capsys.readouterr().out
    assert (out / "train.txt").exists() and (out / "val.txt").exists() and (out / "classes.txt").exists()
    assert main(["--out", str(out), "--size", "15"]) == 2


def test_hard_preset_classes_show_the_same_frames_in_eight_orders(tmp_path):
    from tsm_dist.data.synthetic import HARD_CLASSES, HARD_FLIP_LABEL_MAP, render_hard_scene

    frames = 16
    orders = [frame_order(label, frames) for label in range(len(HARD_CLASSES))]
    assert len({o.tobytes() for o in orders}) == 8  # eight different orders
    for label, order in enumerate(orders):
        assert sorted(order.tolist()) == list(range(frames))  # each a permutation: the same frames
        assert frame_order(HARD_FLIP_LABEL_MAP[label], frames).tolist() == (frames - 1 - order).tolist()
    assert frame_order(4, 6).tolist() == [0, 2, 4, 5, 3, 1] and frame_order(6, 6).tolist() == [3, 4, 5, 0, 1, 2]
    scene = render_hard_scene(np.random.default_rng(3), frames, 32)
    assert scene.shape == (frames, 32, 32, 3)
    # noise and the jumping blobs change every frame; the scene is not static
    assert np.abs(np.diff(scene.astype(np.int16), axis=0)).mean(axis=(1, 2, 3)).min() > 2
    made = make_synthetic(str(tmp_path / "hard"), preset="hard", videos_per_class=2, frames=8, size=16, seed=1)
    assert read_class_names(made.classes_file) == list(HARD_CLASSES) and (made.num_train, made.num_val) == (8, 8)
    again = make_synthetic(str(tmp_path / "again"), preset="hard", videos_per_class=2, frames=8, size=16, seed=1)
    train, _ = read_file_list(made.train_list, num_classes=8)
    assert sorted({r.label for r in train}) == list(range(8))
    for record in train:
        assert open(record.resolve(made.root), "rb").read() == open(record.resolve(again.root), "rb").read()
    with pytest.raises(ValueError, match="unknown preset 'easy'"):
        make_synthetic(str(tmp_path / "x"), preset="easy")


def test_cli_hard_preset(tmp_path, capsys):
    out = tmp_path / "hard_cli"
    assert main(["--out", str(out), "--preset", "hard", "--videos-per-class", "2", "--frames", "4", "--size", "16"]) == 0
    assert "wrote 8 train and 8 val videos of 8 classes" in capsys.readouterr().out
