"""File lists and the Kinetics / Something-Something V2 converters."""
from __future__ import annotations

import json

import pytest

from tsm_dist.data.convert import kinetics_records, main as convert_main, sthv2_records
from tsm_dist.data.errors import FileListError
from tsm_dist.data.filelist import VideoRecord, read_class_names, read_file_list, write_file_list


def _write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_file_list_round_trip_with_ranges_spaces_and_comments(tmp_path):
    records = [VideoRecord("a/x.webm", 0), VideoRecord("air drumming/y 1.mp4", 3, 10, 50)]
    write_file_list(str(tmp_path / "l.txt"), records)
    text = "# header comment\n\n" + (tmp_path / "l.txt").read_text()
    parsed, skipped = read_file_list(_write(tmp_path / "l.txt", text), num_classes=4)
    assert [(r.path, r.label, r.start, r.end) for r in parsed] == [
        ("a/x.webm", 0, None, None),
        ("air drumming/y 1.mp4", 3, 10, 50),
    ]
    assert parsed[1].where.endswith("l.txt:4") and skipped == []
    assert parsed[0].resolve("/data") == "/data/a/x.webm"


@pytest.mark.parametrize(
    "line, message",
    [
        ("video.webm 7", "label 7 of video.webm is outside the classes [0, 4)"),
        ("video.webm -1", "label -1"),
        ("video.webm", "expected 'path label"),
        ("video.webm 1 9 3", "frame range [9, 3)"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "list.txt", f"ok.webm 1\n{line}\n")
    with pytest.raises(FileListError) as err:
        read_file_list(path, num_classes=4)
    assert f"{path}:2" in str(err.value) and message in str(err.value)
    records, skipped = read_file_list(path, num_classes=4, skip_invalid=True)
    assert [r.path for r in records] == ["ok.webm"]
    assert len(skipped) == 1 and f"{path}:2" in skipped[0][1]


def test_missing_or_empty_list_is_an_error(tmp_path):
    with pytest.raises(FileListError, match="does not exist"):
        read_file_list(str(tmp_path / "nope.txt"))
    with pytest.raises(FileListError, match="no usable video"):
        read_file_list(_write(tmp_path / "empty.txt", "# nothing\n"))


KINETICS_CSV = """label,youtube_id,time_start,time_end,split
zumba,abc,10,20,train
air drumming,def,0,10,train
zumba,ghi,5,15,train
"""


def test_kinetics_csv(tmp_path):
    csv_path = _write(tmp_path / "train.csv", KINETICS_CSV)
    records, names = kinetics_records(csv_path)
    assert names == ["air drumming", "zumba"]
    assert [(r.path, r.label) for r in records] == [
        ("abc_000010_000020.mp4", 1),
        ("def_000000_000010.mp4", 0),
        ("ghi_000005_000015.mp4", 1),
    ]
    records, _ = kinetics_records(csv_path, names, template="{label_}/{youtube_id}.mp4")
    assert records[1].path == "air_drumming/def.mp4"
    with pytest.raises(FileListError, match=r"train\.csv:3: class 'air drumming' is not in the class list"):
        kinetics_records(csv_path, ["zumba"])
    test_csv = _write(tmp_path / "test.csv", "youtube_id,time_start,time_end,split\nabc,0,10,test\n")
    with pytest.raises(FileListError, match="missing columns"):
        kinetics_records(test_csv)


def test_kinetics_cli_writes_classes_and_reports_missing_videos(tmp_path, capsys):
    csv_path = _write(tmp_path / "train.csv", KINETICS_CSV)
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "abc_000010_000020.mp4").write_bytes(b"x")
    out, classes = tmp_path / "train.txt", tmp_path / "classes.txt"
    argv = ["kinetics", "--csv", csv_path, "--write-classes", str(classes), "--out", str(out),
            "--root", str(tmp_path / "videos")]
    assert convert_main(argv) == 0
    assert out.read_text() == "abc_000010_000020.mp4 1\n"
    assert read_class_names(str(classes)) == ["air drumming", "zumba"]
    err = capsys.readouterr().err
    assert "2 videos missing" in err and "def_000000_000010.mp4" in err
    # validation reuses the training classes
    argv = ["kinetics", "--csv", csv_path, "--classes", str(classes), "--out", str(tmp_path / "val.txt")]
    assert convert_main(argv) == 0
    assert read_file_list(str(tmp_path / "val.txt"), num_classes=2)[0][1].label == 0


def test_kinetics_cli_with_every_video_missing_is_a_data_error_naming_one(tmp_path, capsys):
    """Not "wrote 0 videos" and exit 0 (issue 32): how many are missing and where one was looked for."""
    csv_path = _write(tmp_path / "train.csv", KINETICS_CSV)
    (tmp_path / "videos").mkdir()
    out = tmp_path / "train.txt"
    argv = ["kinetics", "--csv", csv_path, "--write-classes", str(tmp_path / "classes.txt"), "--out", str(out),
            "--root", str(tmp_path / "videos")]
    assert convert_main(argv) == 4
    err = capsys.readouterr().err.strip()
    assert err.startswith("convert: all 3 videos are missing under ") and "nothing written" in err, err
    assert f"e.g. {tmp_path / 'videos' / 'abc_000010_000020.mp4'} (" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_sthv2_json(tmp_path):
    labels = _write(
        tmp_path / "labels.json",
        json.dumps({"Pushing something from left to right": "0", "Pushing something from right to left": "1"}),
    )
    entries = [
        {"id": "12", "label": "pushing pen from right to left", "template": "Pushing [something] from right to left"},
        {"id": "7", "label": "pushing cup from left to right", "template": "Pushing [something] from left to right"},
    ]
    split = _write(tmp_path / "train.json", json.dumps(entries))
    records, names = sthv2_records(split, labels)
    assert names == ["Pushing something from left to right", "Pushing something from right to left"]
    assert [(r.path, r.label) for r in records] == [("12.webm", 1), ("7.webm", 0)]
    out, classes = tmp_path / "train.txt", tmp_path / "classes.txt"
    argv = ["sthv2", "--json", split, "--labels", labels, "--out", str(out), "--write-classes", str(classes)]
    assert convert_main(argv) == 0
    assert out.read_text() == "12.webm 1\n7.webm 0\n" and read_class_names(str(classes)) == names
    test_split = _write(tmp_path / "test.json", json.dumps([{"id": "3"}]))
    with pytest.raises(FileListError, match=r"test\.json\[0\]: entry has no 'id' or 'template'"):
        sthv2_records(test_split, labels)
    assert convert_main(["sthv2", "--json", test_split, "--labels", labels, "--out", str(out)]) == 1
