"""Convert Kinetics CSV and Something-Something V2 JSON annotations to file lists.

  tsm-dist convert kinetics --csv train.csv --write-classes classes.txt --out train.txt
  tsm-dist convert kinetics --csv validate.csv --classes classes.txt --out val.txt
  tsm-dist convert sthv2 --json something-something-v2-train.json \\
      --labels something-something-v2-labels.json --write-classes classes.txt --out train.txt

Kinetics rows (``label,youtube_id,time_start,time_end,split[,...]``) become
``--template`` paths (default ``{youtube_id}_{time_start:06d}_{time_end:06d}.mp4``; ``{label}`` and
``{label_}``, the label with spaces as underscores, are also available). Class indices are the
sorted class names (``--write-classes``) or an existing ``classes.txt`` (``--classes``), so that
train and validation agree. Something-Something entries map their ``template`` (without brackets)
through the labels file; paths default to ``{id}.webm``. With ``--root`` the videos are checked and
missing ones are left out and reported; when every video is missing nothing is written (exit 4). Errors name the annotation file and line or entry.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Sequence

from tsm_dist.data.errors import FileListError
from tsm_dist.commands.exit_codes import EXIT_DATA
from tsm_dist.data.filelist import VideoRecord, read_class_names, write_class_names, write_file_list

KINETICS_TEMPLATE = "{youtube_id}_{time_start:06d}_{time_end:06d}.mp4"
STHV2_TEMPLATE = "{id}.webm"


def _format(template: str, fields: dict, where: str) -> str:
    try:
        return template.format(**fields)
    except (KeyError, ValueError) as err:
        raise FileListError(f"{where}: cannot fill path template {template!r} ({err!r})") from err


def kinetics_records(
    csv_path: str, class_names: Sequence[str] | None = None, template: str = KINETICS_TEMPLATE
) -> tuple[list[VideoRecord], list[str]]:
    """Records of a Kinetics CSV and the class names used (sorted labels of the CSV if not given)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise FileListError(f"{csv_path}: no rows")
    missing = {"label", "youtube_id", "time_start", "time_end"} - set(rows[0])
    if missing:
        raise FileListError(f"{csv_path}: missing columns {sorted(missing)} (a test split has no labels)")
    names = list(class_names) if class_names is not None else sorted({r["label"] for r in rows})
    index = {name: i for i, name in enumerate(names)}
    records = []
    for line_no, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{csv_path}:{line_no}"
        if row["label"] not in index:
            raise FileListError(f"{where}: class {row['label']!r} is not in the class list")
        try:
            fields = dict(row, time_start=int(row["time_start"]), time_end=int(row["time_end"]))
        except (TypeError, ValueError) as err:
            raise FileListError(f"{where}: time_start/time_end must be integers ({err})") from err
        fields["label_"] = row["label"].replace(" ", "_")
        records.append(VideoRecord(_format(template, fields, where), index[row["label"]], where=where))
    return records, names


def sthv2_records(
    json_path: str, labels_path: str, template: str = STHV2_TEMPLATE
) -> tuple[list[VideoRecord], list[str]]:
    """Records of a Something-Something V2 split and the class names ordered by label index."""
    with open(labels_path, encoding="utf-8") as f:
        labels = {name: int(i) for name, i in json.load(f).items()}
    names = [""] * len(labels)
    for name, i in labels.items():
        if not 0 <= i < len(names) or names[i]:
            raise FileListError(f"{labels_path}: label indices must be 0..{len(names) - 1}, each once; bad at {name!r}")
        names[i] = name
    with open(json_path, encoding="utf-8") as f:
        entries = json.load(f)
    records = []
    for n, entry in enumerate(entries):
        where = f"{json_path}[{n}]"
        if "template" not in entry or "id" not in entry:
            raise FileListError(f"{where}: entry has no 'id' or 'template' (a test split has no labels)")
        name = entry["template"].replace("[", "").replace("]", "")
        if name not in labels:
            raise FileListError(f"{where}: class {name!r} is not in {labels_path}")
        records.append(VideoRecord(_format(template, entry, where), labels[name], where=where))
    return records, names


def _keep_existing(records: list[VideoRecord], root: str) -> tuple[list[VideoRecord], list[VideoRecord]]:
    present: list[VideoRecord] = []
    missing: list[VideoRecord] = []
    for r in records:
        (present if os.path.exists(r.resolve(root)) else missing).append(r)
    return present, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tsm-dist convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="dataset", required=True)
    kin = sub.add_parser("kinetics", help="Kinetics-400/600/700 CSV")
    kin.add_argument("--csv", required=True)
    kin.add_argument("--template", default=KINETICS_TEMPLATE, help=f"video path pattern (default {KINETICS_TEMPLATE})")
    sth = sub.add_parser("sthv2", help="Something-Something V2 JSON")
    sth.add_argument("--json", required=True, help="train or validation annotations")
    sth.add_argument("--labels", required=True, help="something-something-v2-labels.json")
    sth.add_argument("--template", default=STHV2_TEMPLATE, help=f"video path pattern (default {STHV2_TEMPLATE})")
    for p in (kin, sth):
        p.add_argument("--out", required=True, help="file list to write")
        p.add_argument("--root", help="video directory: leave out (and report) videos missing there")
        if p is kin:
            group = p.add_mutually_exclusive_group(required=True)
            group.add_argument("--classes", help="existing classes.txt fixing the label indices")
            group.add_argument("--write-classes", help="write the sorted class names of this CSV here")
        else:
            p.add_argument("--write-classes", help="write the class names (by label index) here")
    args = parser.parse_args(argv)
    try:
        if args.dataset == "kinetics":
            names = read_class_names(args.classes) if args.classes else None
            records, names = kinetics_records(args.csv, names, args.template)
        else:
            records, names = sthv2_records(args.json, args.labels, args.template)
    except (FileListError, OSError, json.JSONDecodeError) as err:
        print(f"convert: {err}", file=sys.stderr)
        return 1
    if args.root:
        records, missing = _keep_existing(records, args.root)
        if missing and not records:  # an empty list would only fail later, on the cluster, as "0 videos"
            example = missing[0]
            print(f"convert: all {len(missing)} videos are missing under {args.root}, e.g. "
                  f"{example.resolve(args.root)} ({example.where}); nothing written to {args.out} "
                  "(check --root and --template)", file=sys.stderr)
            return EXIT_DATA
        if missing:
            shown = ", ".join(f"{r.path} ({r.where})" for r in missing[:5])
            print(f"convert: {len(missing)} videos missing under {args.root}, left out: {shown}"
                  + (" ..." if len(missing) > 5 else ""), file=sys.stderr)
    count = write_file_list(args.out, records)
    if args.write_classes:
        write_class_names(args.write_classes, names)
    print(f"wrote {count} videos of {len(names)} classes to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
