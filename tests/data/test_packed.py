"""Packed video shards (``tsm-dist pack``): layout, resume, verify, damaged shards, transcoding, and loaders
that read a packed directory in place of a file list with the same clips, fewer file opens, no probing."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import threading
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from conftest import PYTHON, REPO as ROOT, horovodrun, launcher_env, run_bounded, video_loader
from tsm_dist.data.encode import write_video
from tsm_dist.data.errors import DataError, VideoError
from tsm_dist.data.feed import Feeder
from tsm_dist.data.pack.write import main as pack_main
from tsm_dist.data.pack.format import load_packed, shard_name
from tsm_dist.data.sharding import shard_slots
from tsm_dist.commands.exit_codes import EXIT_DATA

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ["dali", "pyav"]
SHARD_MB = "0.01"  # about 10 KiB: the 16 test videos (2.5 KiB each) go to 4 shards


@pytest.fixture(scope="module")
def packed(synthetic, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("packed") / "train.pack")
    assert pack_main(["--list", synthetic.train_list, "--root", synthetic.root, "--out", out,
                      "--shard-mb", SHARD_MB, "--no-progress"]) == 0
    return out


def _pack_files(out: str) -> dict[str, bytes]:
    return {name: (Path(out) / name).read_bytes() for name in sorted(os.listdir(out))}


_loader = functools.partial(video_loader, batch_size=3, num_classes=4)


def _epochs(loader, epochs=(0, 1)):
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out.extend(loader)
    return out


def test_layout_index_and_shards(synthetic, packed):
    meta = json.loads((Path(packed) / "pack.json").read_text())
    assert (meta["format"], meta["version"], meta["complete"], meta["videos"]) == ("tsm-dist-packed", 1, True, 16)
    assert len(meta["shards"]) >= 3  # 16 videos of 2.5 KiB in 10 KiB shards
    entries = [json.loads(line) for line in (Path(packed) / "index.jsonl").read_text().splitlines()]
    listed = [line.split() for line in Path(synthetic.train_list).read_text().splitlines()]
    assert [(e["path"], e["label"]) for e in entries] == [(p, int(l)) for p, l in listed]  # list order kept
    for e in entries:
        original = (Path(synthetic.root) / e["path"]).read_bytes()
        shard = (Path(packed) / meta["shards"][e["shard"]]["file"]).read_bytes()
        assert shard[e["offset"]: e["offset"] + e["length"]] == original
        assert e["crc32"] == zlib.crc32(original)
        assert (e["frames"], e["height"], e["width"], e["codec"]) == (16, 32, 32, "vp9")
    for number, shard in enumerate(meta["shards"]):
        assert os.path.getsize(Path(packed) / shard["file"]) == shard["bytes"] <= 0.01 * 2**20


def test_the_20_line_reader_in_the_docs_works(synthetic, packed):
    doc = (REPO / "docs" / "data.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "def read_packed(" in b)
    assert len(block.strip().splitlines()) <= 20
    namespace: dict = {}
    exec(block, namespace)
    got = list(namespace["read_packed"](packed))
    assert len(got) == 16
    for entry, data in got:
        assert data == (Path(synthetic.root) / entry["path"]).read_bytes()


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_clips_equal_unpacked_clips(synthetic, packed, backend):
    unpacked = _epochs(_loader(synthetic.train_list, synthetic.root, backend=backend))
    from_pack = _epochs(_loader(packed, None, backend=backend))
    assert len(unpacked) == len(from_pack) == 2 * 6
    for (a, la), (b, lb) in zip(unpacked, from_pack):
        assert torch.equal(la, lb) and torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_read_contiguous_shard_ranges_with_the_same_clips(synthetic, packed, backend):
    index = load_packed(packed)
    shard_of = {r.where: loc.shard for r, loc in zip(index.records, index.locations)}
    for rank in range(2):
        plain = _loader(synthetic.train_list, synthetic.root, backend=backend, shard_id=rank, num_shards=2,
                        partition="contiguous")
        pack = _loader(packed, None, backend=backend, shard_id=rank, num_shards=2)  # contiguous by default
        assert pack.planner.contiguous
        for (a, la), (b, lb) in zip(_epochs(plain), _epochs(pack)):
            assert torch.equal(la, lb) and torch.equal(a, b)
        pack.set_epoch(0)
        shards = {shard_of[s.where] for b in range(len(pack)) for s in pack.planner.batch(b)}
        assert len(shards) <= len(index.meta["shards"]) // 2 + 1  # its contiguous half, not all shards
        counters = pack.io_counters()
        assert counters["probes"] == 0  # nothing probed: the index has frame counts, sizes, codecs


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_opens_and_bytes_are_counted(synthetic, packed, backend):
    """Unpacked: one probe and one open per video; packed: one open per shard, no probe. The count is
    checked against Python's audit hook (every open() of the process)."""
    opened: list[str] = []
    tracing = threading.Event()

    def hook(event, args):
        if tracing.is_set() and event == "open" and isinstance(args[0], str) and args[0].endswith((".webm", ".bin")):
            opened.append(args[0])

    import sys

    sys.addaudithook(hook)
    for source, root in ((synthetic.train_list, synthetic.root), (packed, None)):
        loader = _loader(source, root, backend=backend, batch_size=4)
        opened.clear()
        tracing.set()
        list(loader)
        tracing.clear()
        counters = loader.io_counters()
        assert counters["files_opened"] == len(opened)
        if root is None:
            assert counters["probes"] == 0 and counters["files_opened"] == len(load_packed(packed).meta["shards"])
            assert counters["bytes_read"] == sum(s["bytes"] for s in load_packed(packed).meta["shards"])
        else:
            assert counters["probes"] == 16 and counters["files_opened"] == 16


def test_resume_continues_an_interrupted_pack(synthetic, packed, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(packed, out)
    meta = json.loads((out / "pack.json").read_text())
    meta["complete"] = False
    (out / "pack.json").write_text(json.dumps(meta))
    lines = (out / "index.jsonl").read_text().splitlines(keepends=True)
    cut = json.loads(lines[6])  # killed after writing video 7's bytes, while writing its index line
    (out / "index.jsonl").write_text("".join(lines[:6]) + lines[6][:25])
    with open(out / shard_name(cut["shard"]), "r+b") as f:
        f.truncate(cut["offset"] + cut["length"])
    for later in range(cut["shard"] + 1, len(meta["shards"])):  # begun, not indexed: to be rewritten
        with open(out / shard_name(later), "r+b") as f:
            f.truncate(10)
    assert pack_main(["--list", synthetic.train_list, "--root", synthetic.root, "--out", str(out),
                      "--shard-mb", SHARD_MB, "--no-progress"]) == 0
    assert _pack_files(str(out)) == _pack_files(packed)  # byte for byte what an uninterrupted run wrote


def test_rerun_with_other_settings_is_refused(synthetic, packed, capsys):
    assert pack_main(["--list", synthetic.train_list, "--root", synthetic.root, "--out", packed,
                      "--shard-mb", "2", "--no-progress"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_verify_and_a_damaged_shard(synthetic, packed, tmp_path, capsys):
    assert pack_main(["--verify", packed, "--no-progress"]) == 0
    assert "OK, 16 videos" in capsys.readouterr().out
    out = tmp_path / "damaged"
    shutil.copytree(packed, out)
    victim = load_packed(str(out)).locations[5]
    shard = bytearray(Path(victim.shard).read_bytes())
    shard[victim.offset + 100] ^= 0xFF
    Path(victim.shard).write_bytes(bytes(shard))
    assert pack_main(["--verify", str(out), "--no-progress"]) == EXIT_DATA
    err = capsys.readouterr().err
    assert f"{victim.shard} at offset {victim.offset}" in err and "checksum mismatch" in err
    for backend in BACKENDS:
        with pytest.raises(VideoError, match=f"damaged packed shard {re.escape(victim.shard)} at offset "
                                             f"{victim.offset}.*checksum mismatch"):
            list(_loader(str(out), None, backend=backend, train=False))
        loader = _loader(str(out), None, backend=backend, train=False, skip_corrupt=True)
        labels = torch.cat([labels for _, labels in loader])
        assert (labels >= 0).sum() == 15 and len(loader.skipped) == 1
        assert f"at offset {victim.offset}" in loader.skipped[0][1]


def test_truncated_shard_names_shard_and_offset(packed, tmp_path):
    out = tmp_path / "truncated"
    shutil.copytree(packed, out)
    last = load_packed(str(out)).locations[-1]
    with open(last.shard, "r+b") as f:
        loader = _loader(str(out), None, backend="pyav", train=False)  # cut after the start-up check
        f.truncate(last.offset + 10)
    with pytest.raises(VideoError, match=f"{re.escape(last.shard)} at offset {last.offset}.*ends after 10 of"):
        list(loader)
    with pytest.raises(DataError, match=f"{re.escape(last.shard)}: {last.offset + 10} bytes, pack.json records"):
        _loader(str(out), None, backend="pyav", train=False)  # found at start, before any read


def test_bad_videos_are_skipped_and_reported(synthetic, tmp_path, capsys):
    (tmp_path / "corrupt.webm").write_bytes(b"\x1aE\xdf\xa3" + np.random.default_rng(0).bytes(3000))
    good = Path(synthetic.train_list).read_text().splitlines()[:3]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join([good[0], f"{tmp_path}/missing.webm 1", good[1], f"{tmp_path}/corrupt.webm 2",
                              "no label here", good[2]]) + "\n")
    out = tmp_path / "out"
    assert pack_main(["--list", str(lst), "--root", synthetic.root, "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 bad video(s)" in err and "missing.webm: file not found" in err and "corrupt.webm" in err
    assert "malformed list line" in err
    assert [json.loads(line)["path"] for line in (out / "skipped.jsonl").read_text().splitlines()] == [
        f"{tmp_path}/missing.webm", f"{tmp_path}/corrupt.webm"]
    assert len(load_packed(str(out)).records) == 3


def test_transcode_to_short_gop_vp9_in_parallel_workers(tmp_path):
    scene = np.random.default_rng(0).integers(0, 255, (34, 70, 3), dtype=np.uint8)
    frames = np.stack([scene[:, k: k + 46] for k in range(20)])  # a slow pan: no scene cut
    lines = []
    for i in range(3):
        write_video(str(tmp_path / f"m{i}.avi"), frames, codec="mjpeg")
        lines.append(f"m{i}.avi {i}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "vp9"
    assert pack_main(["--list", str(tmp_path / "list.txt"), "--root", str(tmp_path), "--out", str(out),
                      "--transcode", "vp9", "--gop", "4", "--workers", "2", "--no-progress"]) == 0
    index = load_packed(str(out))
    assert [(i.codec, i.num_frames, i.height, i.width) for i in index.infos] == [("vp9", 20, 34, 46)] * 3
    assert not (out / ".transcode").exists()
    loc = index.locations[0]
    with open(loc.shard, "rb") as f:
        f.seek(loc.offset)
        data = f.read(loc.length)
    import io

    with av.open(io.BytesIO(data)) as container:
        keyframes = [k for k, p in enumerate(container.demux(container.streams.video[0])) if p.size and p.is_keyframe]
    assert keyframes == [0, 4, 8, 12, 16]
    clips, labels = next(iter(_loader(str(out), None, backend="dali", batch_size=3, num_classes=3, train=False)))
    assert clips.shape == (3, 8, 3, 32, 32) and labels.tolist() == [0, 1, 2]


def test_contiguous_sharding_rule():
    n, shards, batch = 23, 3, 4
    seen = []
    for k in range(shards):
        slots = shard_slots(n, batch_size=batch, shard_id=k, num_shards=shards, train=False, contiguous=True)
        seen += [s for s in slots.tolist() if s >= 0]
        mine = [s for s in slots.tolist() if s >= 0]
        assert mine == list(range(k * n // shards, (k + 1) * n // shards))
    assert sorted(seen) == list(range(n))  # evaluation: every sample once
    for epoch in range(3):
        blocks = []
        for k in range(shards):
            slots = shard_slots(n, batch_size=batch, shard_id=k, num_shards=shards, train=True, epoch=epoch,
                                contiguous=True)
            block = (k + epoch) % shards
            assert set(slots.tolist()) == set(range(block * n // shards, (block + 1) * n // shards))
            blocks.append(block)
        assert sorted(blocks) == [0, 1, 2]  # the blocks rotate over the ranks
    one = dict(batch_size=batch, shard_id=0, num_shards=1, train=True, seed=5, epoch=2)
    assert np.array_equal(shard_slots(n, contiguous=True, **one), shard_slots(n, **one))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bytes_are_read_off_the_consuming_thread(packed, backend):
    loader = _loader(packed, None, backend=backend)
    readers: set[str] = set()
    read = loader.reader.read

    def spy(*args):
        readers.add(threading.current_thread().name)
        return read(*args)

    loader.reader.read = spy
    threaded = list(loader)
    assert threading.current_thread().name not in readers
    inline = _loader(packed, None, backend=backend, feed_thread=False)
    for (a, la), (b, lb) in zip(threaded, inline):
        assert torch.equal(la, lb) and torch.equal(a, b)


def test_feeder_hands_errors_over_in_order():
    def produce(index):
        if index == 3:
            raise VideoError("x.webm", "broken")
        return index * 10

    feeder = Feeder(produce, 1, 6, depth=2)
    assert [feeder.get(), feeder.get()] == [(1, 10), (2, 20)]
    with pytest.raises(VideoError, match="broken"):
        feeder.get()
    with pytest.raises(StopIteration):
        feeder.get()
    feeder.close()


def test_config_train_list_may_name_a_packed_directory(synthetic, packed):
    """``data.train_list: OUT`` (relative to data.root, the one data-path rule) builds a packed loader."""
    from types import SimpleNamespace

    from tsm_dist.training.build import build_loader_from_config
    from tsm_dist.config import load_config

    cfg = load_config(None, [f"data.root={os.path.dirname(packed)}", f"data.train_list={os.path.basename(packed)}",
                             "data.backend=pyav", "data.feed_thread=false", "model.num_classes=4",
                             "data.batch_size=4", "data.crop_size=32"])
    engine = SimpleNamespace(rank=1, size=2, device=torch.device("cpu"))
    loader = build_loader_from_config(cfg, engine, train=True)
    assert loader.planner.locations is not None and loader.planner.contiguous and not loader.feed_thread
    assert len(loader) == 2 and loader.planner.shard_id == 1


def test_inline_feeder_keeps_depth_results_ahead_on_the_calling_thread():
    produced: list[tuple[int, str]] = []

    def produce(index):
        produced.append((index, threading.current_thread().name))
        return index

    feeder = Feeder(produce, 0, 5, depth=2, thread=False)
    assert feeder.get() == (0, 0) and [i for i, _ in produced] == [0, 1]
    assert {name for _, name in produced} == {threading.current_thread().name}
    assert [feeder.get()[0] for _ in range(4)] == [1, 2, 3, 4]
    with pytest.raises(StopIteration):
        feeder.get()


def test_training_and_evaluation_read_packed_directories(synthetic, packed, tmp_path):
    """The trainer end to end (1 process, torch engine, DALI): train and val lists are packed directories."""

    val = str(tmp_path / "val.pack")
    assert pack_main(["--list", synthetic.val_list, "--root", synthetic.root, "--out", val, "--no-progress"]) == 0
    result = run_bounded(
        [PYTHON, "-m", "tsm_dist.training.train", "--config", "configs/synthetic_tsm.yaml", "--workdir", str(tmp_path / "run"),
         "--set", f"data.train_list={packed}", "--set", f"data.val_list={val}", "--set", "data.root=",
         "--set", "data.backend=dali", "--set", "engine.name=torch", "--set", "log.wandb=disabled",
         "--set", "train.epochs=1", "--set", "data.batch_size=4", "--set", "data.crop_size=32",
         "--set", "data.scale_size=32", "--set", "model.width=8", "--set", "log.interval=1"],
        timeout=180, env=launcher_env(), cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "step" for r in records) == 4  # 16 packed videos / batch 4
    assert any(r["type"] == "eval" for r in records) and records[-1]["status"] == "completed"


def test_a_second_pack_into_the_same_directory_is_refused(synthetic, tmp_path, capsys):
    import fcntl

    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert pack_main(["--list", synthetic.train_list, "--root", synthetic.root, "--out", str(out),
                          "--no-progress"]) == 2
    assert f"another 'tsm-dist pack' is writing {out}" in capsys.readouterr().err


def test_the_sweep_sizes_its_epoch_from_a_packed_directory(packed):
    from tsm_dist.config import load_config
    from tsm_dist.studies.scaling.sweep import _dataset_size

    cfg = load_config(None, [f"data.train_list={packed}"])
    assert _dataset_size(cfg, Path("x.yaml")) == 16


def test_check_data_verifies_a_packed_directory(packed, tmp_path, capsys):
    from tsm_dist.commands.check_data import main as check_data
    from tsm_dist.commands.exit_codes import EXIT_DATA

    sets = ["--set", "model.num_classes=4", "--set", "data.root=", "--set", "data.val_list=", "--set",
            "model.num_frames=8"]
    assert check_data(["--config", str(REPO / "configs/synthetic_tsm.yaml"), "--set", f"data.train_list={packed}",
                       *sets]) == 0
    captured = capsys.readouterr()
    assert "16 entries, 16 usable, 0 bad" in captured.out
    # as docs/data.md says: a pack's videos are checked against its index, not probed (issue 32)
    assert "16/16 videos checked against the pack's index (not probed)" in captured.err
    assert "videos probed" not in captured.err
    out = tmp_path / "damaged"
    shutil.copytree(packed, out)
    victim = load_packed(str(out)).locations[3]
    with open(victim.shard, "r+b") as f:
        f.seek(victim.offset + 50)
        f.write(b"\0\0\0\0")
    assert check_data(["--config", str(REPO / "configs/synthetic_tsm.yaml"), "--set", f"data.train_list={out}",
                       *sets]) == EXIT_DATA
    assert f"{victim.shard} at offset {victim.offset}" in capsys.readouterr().out


def test_shuffled_pack_stores_a_seeded_permutation(synthetic, tmp_path):
    out = tmp_path / "shuffled"
    assert pack_main(["--list", synthetic.train_list, "--root", synthetic.root, "--out", str(out), "--shuffle", "3",
                      "--no-progress"]) == 0
    entries = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [e["item"] for e in entries] == np.random.default_rng(3).permutation(16).tolist()
    listed = Path(synthetic.train_list).read_text().splitlines()
    assert [f"{e['path']} {e['label']}" for e in entries] == [listed[e["item"]] for e in entries]


def test_a_torn_skipped_line_is_cut_on_resume(tmp_path):
    from tsm_dist.data.pack.write import _read_skipped

    (tmp_path / "skipped.jsonl").write_text('{"item": 1, "path": "a", "reason": "r"}\n{"item": 4, "pa')
    assert _read_skipped(str(tmp_path)) == [{"item": 1, "path": "a", "reason": "r"}]
    assert (tmp_path / "skipped.jsonl").read_text() == '{"item": 1, "path": "a", "reason": "r"}\n'


def test_a_killed_pack_resumes_to_the_same_bytes(synthetic, tmp_path):
    """SIGKILL a real 'tsm-dist pack' mid-run, run it again: the result equals an uninterrupted pack."""
    import signal
    import subprocess
    import sys
    import time

    from tsm_dist.studies.data_io.pack_io import repeat_list

    long_list = str(tmp_path / "long.txt")
    repeat_list(synthetic.train_list, synthetic.root, long_list, 600)
    argv = ["--list", long_list, "--shard-mb", "0.2", "--no-progress"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tsm_dist.data.pack.write", *argv, "--out", str(killed)],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        index = killed / "index.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if index.exists() and index.read_text().count("\n") >= 100:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "pack finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not json.loads((killed / "pack.json").read_text())["complete"]
    assert pack_main([*argv, "--out", str(killed)]) == 0
    assert pack_main([*argv, "--out", str(tmp_path / "whole")]) == 0
    assert _pack_files(str(killed)) == _pack_files(str(tmp_path / "whole"))


@pytest.mark.multirank
def test_two_horovod_ranks_train_and_evaluate_on_packed_directories(synthetic, packed, tmp_path):
    """2 ranks under horovodrun, each reading its contiguous block: every validation video counted once."""

    val = str(tmp_path / "val.pack")
    assert pack_main(["--list", synthetic.val_list, "--root", synthetic.root, "--out", val, "--no-progress"]) == 0
    sets = [f"data.train_list={packed}", f"data.val_list={val}", "data.root=", "data.backend=pyav",
            "engine.name=horovod", "log.wandb=disabled", "train.epochs=1", "data.batch_size=2",
            "data.val_batch_size=3", "data.crop_size=32", "data.scale_size=32", "model.width=8", "log.interval=1"]
    cmd = horovodrun(2, PYTHON, "-m", "tsm_dist.training.train", "--config", "configs/synthetic_tsm.yaml", "--workdir",
                     str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)])
    result = run_bounded(cmd, timeout=240, env=launcher_env(PYTHONPATH=str(ROOT)), cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["world_size"] == 2 and sum(r["type"] == "step" for r in records) == 4  # 16 / (2 x 2)
    evals = [r for r in records if r["type"] == "eval"]
    assert evals and evals[-1]["num_samples"] == 4  # the 4 packed val videos, 2 per rank, none twice
    assert records[-1]["status"] == "completed"


# ------------------------------------------------------------------- packing never touches foreign files
def test_pack_refuses_a_directory_of_foreign_files_and_touches_none(synthetic, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / shard_name(0)).write_bytes(b"a user's own shard")
    (out / "index.jsonl").write_text('{"theirs": 1}\n')
    before = _pack_files(str(out))
    assert pack_main(["--list", synthetic.train_list, "--root", synthetic.root, "--out", str(out),
                      "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty and holds no pack" in err[0] and shard_name(0) in err[0]
    assert _pack_files(str(out)) == before


@pytest.mark.parametrize("damage, expected", [
    (lambda line: json.dumps({k: v for k, v in json.loads(line).items() if k != "offset"}), "malformed index entry"),
    (lambda line: json.dumps({**json.loads(line), "shard": "zero"}), "malformed index entry"),
    (lambda line: "{not json", "not a JSON index entry"),
])
def test_verify_gives_one_line_and_the_data_code_for_every_index_problem(packed, tmp_path, capsys, damage, expected):
    out = tmp_path / "bad_index"
    shutil.copytree(packed, out)
    lines = (out / "index.jsonl").read_text().splitlines()
    lines[2] = damage(lines[2])
    (out / "index.jsonl").write_text("\n".join(lines) + "\n")
    assert pack_main(["--verify", str(out), "--no-progress"]) == EXIT_DATA
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and expected in err[0] and "index.jsonl:3" in err[0] and "1 problem" in err[1], err


def test_killing_pack_leaves_no_worker_processes(synthetic, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tsm_dist.data.pack.write", "--list", synthetic.train_list,
                             "--root", synthetic.root, "--out", str(out), "--transcode", "vp9", "--workers", "2",
                             "--no-progress"], stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _children(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)  # the main process only, as `kill PID` does
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143 and "interrupted" in err, err
    time.sleep(0.5)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()
                and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]], workers


def test_a_stop_while_the_pool_starts_is_one_line_and_leaves_no_worker(synthetic, tmp_path, monkeypatch, capsys):
    """SIGTERM while a submit starts the worker pool's thread (CI once caught it there: the shutdown then joined a
    thread whose start was cut short, a traceback instead of the line) stops the pack as anywhere else."""
    import multiprocessing
    import signal
    import time
    from concurrent.futures import process

    start = process._ExecutorManagerThread._bootstrap_inner

    def signalled_start(thread):  # the new thread, before it says it started: the main thread waits for that
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        start(thread)

    monkeypatch.setattr(process._ExecutorManagerThread, "_bootstrap_inner", signalled_start)
    before = set(multiprocessing.active_children())
    code = pack_main(["--list", synthetic.train_list, "--root", synthetic.root, "--out", str(tmp_path / "out"),
                      "--workers", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 143 and "interrupted" in err and "Traceback" not in err, err
    assert not set(multiprocessing.active_children()) - before


def test_spawned_workers_of_a_command_keep_the_default_stop_signals(tmp_path):
    """pack's workers are spawned with the command's argv and import its console script, so tsm_dist too; the
    one-line stop handler stays the command's (a SIGTERM to the whole process group printed one "terminated" line
    per worker besides pack's own line). A script named like the console script spawns one worker the same way."""
    import subprocess
    import sys

    script = tmp_path / "tsm-dist"
    script.write_text("import multiprocessing, signal\nimport tsm_dist\n\n\ndef handlers():\n"
                      "    return [str(signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGINT)]\n\n\n"
                      "if __name__ == '__main__':\n"
                      "    print(str(signal.getsignal(signal.SIGTERM)))\n"
                      "    with multiprocessing.get_context('spawn').Pool(1) as pool:\n"
                      "        print(pool.apply(handlers))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    command, worker = done.stdout.splitlines()
    assert done.returncode == 0 and "_on_stop_signal" in command, done.stdout + done.stderr
    assert "_on_stop_signal" not in worker, worker


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
