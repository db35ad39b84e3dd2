"""The loader factory: :func:`build_video_loader` builds the DALI, PyAV or random loader of one rank's shard
from a file list, records or a packed directory; docs/data.md has the formats and rules."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

from tsm_dist.data.errors import DataError, FileListError, VideoError
from tsm_dist.data.filelist import VideoRecord, check_labels, read_class_names, read_file_list

if TYPE_CHECKING:
    from tsm_dist.data.loader import Loader

BACKENDS = ("dali", "pyav", "random", "procedural")
PARTITIONS = ("interleaved", "contiguous")
FlipMap = Union[Mapping[int, int], Sequence[int], None]

def _as_mapping(flip_label_map: FlipMap) -> Mapping[int, int] | None:
    if flip_label_map is None or isinstance(flip_label_map, Mapping):
        return flip_label_map
    return dict(enumerate(flip_label_map))


def build_video_loader(
    file_list: str | Sequence[VideoRecord] | None, root: str | None, *,
    backend: str = "dali", device: str = "cpu", device_id: int | None = None,
    num_frames: int, sampling: str = "segment", stride: int = 1,
    batch_size: int, crop_size: int, scale_size: int | None = None, train: bool, train_crop: str = "multiscale",
    shard_id: int = 0, num_shards: int = 1, partition: str | None = None, seed: int = 0,
    num_threads: int = 2, prefetch: int = 2, feed_thread: bool = True,
    num_clips: int = 1, num_crops: int = 1, flip: bool = True, flip_label_map: FlipMap = None,
    skip_corrupt: bool = False, num_classes: int | None = None, short_videos: str = "error",
    num_samples: int | None = None, preset: str = "temporal", label_noise: float = 0.0, scene_seed: int = 0,
) -> "Loader":
    """A loader of ``(clips, labels)`` batches for one shard (rank ``shard_id`` of ``num_shards``).

    ``file_list`` is a list file (``path label [start end]`` per line, paths relative to ``root``) or
    records already read, or a packed directory written by ``tsm-dist pack`` (then ``root`` is not used:
    the bytes, frame counts and sizes come from its shards and index, nothing is probed). Clips are float32 (N, T, 3, crop, crop), ImageNet-normalized, or
    (N, V, T, 3, crop, crop) with V = num_clips * num_crops > 1 (testing). Every shard has the same
    ``len(loader)``; padded evaluation slots have label -1 (keep ``labels >= 0``). Call
    ``loader.set_epoch(epoch, start_batch)`` before each epoch to reshuffle or resume.

    ``flip_label_map`` maps a label to its mirror class for horizontal flips (e.g. moving left ->
    moving right). ``short_videos="loop"`` repeats frames of videos shorter than a clip instead of
    failing. ``skip_corrupt`` skips bad videos and list lines, listing them in ``loader.skipped``.
    The ``random`` backend reads nothing: ``num_samples`` and ``num_classes`` set its size and labels. Nor does
    ``procedural``: ``num_samples`` clips of the synthetic ``preset`` rendered in memory at ``crop_size``, the
    set fixed by ``scene_seed``, with ``label_noise`` (:mod:`tsm_dist.data.procedural_loader`).

    ``partition`` is the sharding rule across ranks: ``"interleaved"`` (samples k, k+S, ... of the
    epoch's permutation; the default for file lists) or ``"contiguous"`` (a contiguous block of the
    stored order, so a rank reads a contiguous range of shards; the default for packed directories).
    ``feed_thread=False`` plans and reads batches on the consuming thread instead of a feeder thread.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "random":
        return _random_loader(device, device_id, num_samples=num_samples, batch_size=batch_size,
                              num_frames=num_frames, crop_size=crop_size, num_classes=num_classes,
                              views=num_clips * num_crops, shard_id=shard_id, num_shards=num_shards, seed=seed)
    if backend == "procedural":
        return _procedural_loader(device, device_id, num_samples=num_samples, batch_size=batch_size,
                                  num_frames=num_frames, crop_size=crop_size, num_classes=num_classes, preset=preset,
                                  label_noise=label_noise, scene_seed=scene_seed, train=train,
                                  views=num_clips * num_crops, shard_id=shard_id, num_shards=num_shards, seed=seed)
    from tsm_dist.data.clips import ClipOptions, ClipPlanner

    options = ClipOptions(
        num_frames=num_frames, sampling=sampling, stride=stride, crop_size=crop_size, scale_size=scale_size,
        train=train, num_clips=num_clips, num_crops=num_crops, flip=flip,
        flip_label_map=_as_mapping(flip_label_map), train_crop=train_crop, short_videos=short_videos)
    if file_list is None:
        raise ValueError(f"backend {backend!r} needs a file list")
    if partition not in (None, *PARTITIONS):
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    videos = read_videos(file_list, root, num_classes, skip_corrupt)
    if partition is None:
        partition = "contiguous" if videos.packed else "interleaved"
    planner = ClipPlanner(
        videos.records, videos.root, options, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards,
        seed=seed, skip_corrupt=skip_corrupt, infos=videos.infos, locations=videos.locations,
        contiguous=partition == "contiguous")
    planner.skipped.extend(videos.skipped)
    if backend == "pyav":
        if device != "cpu":
            raise ValueError("the pyav backend decodes on the CPU: use device='cpu' (or backend='dali' for NVDEC)")
        from tsm_dist.data.pyav_loader import PyAVLoader

        return PyAVLoader(planner, num_threads=num_threads, prefetch=prefetch, feed_thread=feed_thread)
    from tsm_dist.data.dali_loader import DaliLoader

    return DaliLoader(planner, device=device, device_id=device_id, num_threads=num_threads, prefetch=prefetch,
                      feed_thread=feed_thread)


def _random_loader(device: str, device_id: int | None, *, num_samples: int | None, num_classes: int | None,
                   **options: Any) -> "Loader":
    if num_samples is None or num_classes is None:
        raise ValueError("the random backend needs num_samples and num_classes")
    from tsm_dist.data.random_loader import RandomLoader

    return RandomLoader(num_samples=num_samples, num_classes=num_classes, device=_torch_device(device, device_id),
                        **options)


def _torch_device(device: str, device_id: int | None) -> Any:
    import torch

    if device == "gpu":
        return torch.device("cuda", torch.cuda.current_device() if device_id is None else device_id)
    return torch.device("cpu")


def _procedural_loader(device: str, device_id: int | None, *, num_samples: int | None, num_classes: int | None,
                       **options: Any) -> "Loader":
    if not num_samples or num_classes is None:
        raise ValueError("the procedural backend needs num_samples > 0 and num_classes")
    from tsm_dist.data.procedural_loader import ProceduralLoader

    # rendered on the CPU, handed over on the data device
    return ProceduralLoader(num_samples=num_samples, num_classes=num_classes,
                            device=_torch_device(device, device_id), **options)


@dataclass
class _Videos:
    """The videos of a list file, of records, or of a packed directory (with their index columns)."""

    records: list[VideoRecord]
    skipped: list[tuple[str, str]]
    root: str | None
    packed: bool = False
    infos: list[Any] | None = None
    locations: list[Any] | None = None


def read_videos(file_list: str | Sequence[VideoRecord], root: str | None, num_classes: int | None,
                skip_corrupt: bool) -> _Videos:
    """The videos of a list file, records, or a packed directory (with its infos and locations), and the
    entries skipped (``skip_corrupt``) or raising :class:`FileListError` (otherwise)."""
    from tsm_dist.data.pack.format import is_packed, load_packed

    if isinstance(file_list, str) and is_packed(file_list):
        packed = load_packed(file_list)
        records, skipped = check_labels(packed.records, num_classes, skip_invalid=skip_corrupt)
        infos, locations = packed.infos, packed.locations
        if skipped:  # labels out of range: keep the columns aligned with the records left
            kept = {id(r) for r in records}
            infos = [info for r, info in zip(packed.records, packed.infos) if id(r) in kept]
            locations = [loc for r, loc in zip(packed.records, packed.locations) if id(r) in kept]
        # the index's paths only name the videos: no root
        return _Videos(records, skipped, None, packed=True, infos=infos, locations=locations)
    if isinstance(file_list, str):
        records, skipped = read_file_list(file_list, num_classes=num_classes, skip_invalid=skip_corrupt)
    else:
        records, skipped = check_labels(list(file_list), num_classes, skip_invalid=skip_corrupt)
    return _Videos(records, skipped, root)
