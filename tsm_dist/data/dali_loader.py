"""DALI backend: video decoding, crop-resize, flip and normalization in a DALI pipeline.

``device="gpu"`` decodes with NVDEC (DALI's "mixed" video decoder: H.264, HEVC, VP8, VP9, AV1,
MPEG-4, MJPEG) and augments on the GPU; clips come out as CUDA tensors. ``device="cpu"`` uses DALI's
CPU decoder, which reads VP8, VP9 and MJPEG only: other codecs are refused up front with an error
naming the file (use backend="pyav" or transcode, e.g. ``ffmpeg -i in.mp4 -c:v libvpx-vp9 out.webm``).

The pipeline reads encoded bytes and planned frame numbers from an external source fed by the clip
plan (``clips.py``), so sampling, sharding, shuffling and crops are those of the PyAV backend; DALI
runs decoding and augmentation in its own threads, ``prefetch`` batches ahead of the consumer. Planning
and reading the bytes (from the video files or from packed shards, ``pack_format.ByteReader``) run on a
feeder thread (``feed.py``), so the external source only hands over batches that are ready.

No padding frames. DALI's decoder fills a requested frame past *its* frame count with zeros by default
(``pad_mode="constant"``), and DALI 2.4 also returns blank frames when the container header promises more
frames than the stream decodes (an MP4 edit list marking the first packets "discard", a truncated file):
frames the plan, counting with the header, believes exist. So the decoder runs with ``pad_mode="none"``
(an out-of-range frame is an error), and every video's decodable frames (its packets with data, not
marked discard: what any decoder outputs) are counted once from the bytes already read: a clip reaching
past them fails naming the video, as the PyAV backend does (or is skipped with ``skip_corrupt``), also with
``short_videos="loop"``, whose repetition is planned from the count the plan believes.
NVDEC (device="gpu") refuses frames smaller than its per-codec minimum: such videos fail up front with a
message, not inside the decoder.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Callable, Iterator

import numpy as np
import torch

from tsm_dist.data.augment import MEAN, STD
from tsm_dist.data.errors import DataError, VideoError
from tsm_dist.data.feed import Feeder
from tsm_dist.data.loader import Batch, VideoLoader
from tsm_dist.data.clips import ClipPlanner, ClipSpec
from tsm_dist.data.pack.format import ByteReader, encoded_file
from tsm_dist.data.probe import DALI_CPU_CODECS

DALI_CPU_HINT = (
    "DALI's CPU decoder reads only VP8, VP9 and MJPEG: use backend='pyav', device='gpu' (NVDEC), "
    "or transcode the file to VP9"
)
DEVICES = ("cpu", "gpu")
# NVDEC's smallest frame (width, height) per codec (NVIDIA Video Codec SDK, NVDEC application note).
NVDEC_MIN_SIZE = {"h264": (48, 16), "hevc": (144, 144), "vp9": (128, 128), "av1": (128, 128), "vp8": (48, 16),
                  "mpeg4": (48, 16), "mjpeg": (64, 64)}
PAD_MODE = "none"  # never pad a clip: frames past the end are an error (see the module docstring)


def _build_pipeline(
    source: Callable[[], tuple], *, decode_device: str, num_crops: int, crop_size: int, **pipeline_kwargs: object
):
    """Graph: encoded bytes + frame numbers -> decode -> per crop: resize the box, flip, normalize."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def clip_pipeline():
        inputs = fn.external_source(source=source, num_outputs=3 + 2 * num_crops, batch=True)
        encoded, frames, mirror = inputs[:3]
        video = fn.decoders.video(encoded, frames=frames, device=decode_device, pad_mode=PAD_MODE)
        outputs = []
        for crop in range(num_crops):
            roi_start, roi_end = inputs[3 + 2 * crop], inputs[4 + 2 * crop]
            resized = fn.resize(
                video, roi_start=roi_start, roi_end=roi_end, size=[crop_size, crop_size], antialias=True
            )
            outputs.append(
                fn.crop_mirror_normalize(
                    resized,
                    mirror=mirror,
                    mean=[255.0 * m for m in MEAN],
                    std=[255.0 * s for s in STD],
                    dtype=types.FLOAT,
                    output_layout="FCHW",
                )
            )
        return tuple(outputs)

    pipe = clip_pipeline(**pipeline_kwargs)
    pipe.build()
    return pipe


@dataclasses.dataclass(frozen=True)
class StreamFacts:
    """What a decoder will see in a file: frames it outputs, codec, frame size."""

    frames: int
    codec: str
    width: int
    height: int


def stream_facts(data: np.ndarray) -> StreamFacts | None:
    """Count the frames a decoder outputs (video packets with data, not marked discard) from the encoded
    bytes, by demuxing only; None if the container cannot be read (DALI then reports the file)."""
    import av

    try:
        with av.open(encoded_file(data)) as container:
            stream = container.streams.video[0]
            ctx = stream.codec_context
            count = sum(1 for p in container.demux(stream) if p.size and not p.is_discard)
            return StreamFacts(count, ctx.name, ctx.width, ctx.height)
    except (av.FFmpegError, IndexError, ValueError):
        return None


def check_clip(spec: ClipSpec, facts: StreamFacts | None, *, nvdec: bool) -> ClipSpec:
    """``spec`` if DALI can decode every planned frame of it as a real frame, else :class:`VideoError`
    naming the video."""
    if facts is None:
        return spec
    if nvdec and facts.codec in NVDEC_MIN_SIZE:
        min_w, min_h = NVDEC_MIN_SIZE[facts.codec]
        if facts.width < min_w or facts.height < min_h:
            raise VideoError(spec.path, f"{facts.width}x{facts.height} {facts.codec} is below NVDEC's minimum "
                             f"{min_w}x{min_h} for this codec; use data.device=cpu or larger videos "
                             "(tsm-dist make-synthetic --size 128)", spec.where)
    last = int(spec.frames.max())
    if last < facts.frames:
        return spec
    raise VideoError(spec.path, f"frame {last} is planned but the stream decodes only {facts.frames} frames "
                     "(the container counts more: packets marked discard by an edit list, or a truncated file); "
                     "DALI would return blank frames. Re-encode the video (or skip it with skip_corrupt)",
                     spec.where)


def _feed(specs: list[ClipSpec], num_crops: int, reader: ByteReader,
          check: Callable[[ClipSpec, np.ndarray], ClipSpec] | None = None) -> tuple[list[np.ndarray], ...]:
    """External-source columns for ``specs``: bytes, frames, mirror, then (roi_start, roi_end) per crop
    in DALI's (y, x) order. ``check`` may refuse a clip (VideoError) or change its frame numbers."""
    encoded = [reader.read(s.path, s.where, s.location) for s in specs]
    if check is not None:
        specs = [check(s, data) for s, data in zip(specs, encoded)]
    columns: list[list[np.ndarray]] = [
        encoded,
        [s.frames for s in specs],
        [np.array(int(s.flip), dtype=np.int32) for s in specs],
    ]
    for crop in range(num_crops):
        columns.append([np.array([s.boxes[crop][1], s.boxes[crop][0]], dtype=np.float32) for s in specs])
        columns.append([np.array([s.boxes[crop][3], s.boxes[crop][2]], dtype=np.float32) for s in specs])
    return tuple(columns)


class DaliLoader(VideoLoader):
    def __init__(
        self,
        planner: ClipPlanner,
        *,
        device: str = "cpu",
        device_id: int | None = None,
        num_threads: int = 2,
        prefetch: int = 2,
        check_codecs: bool = True,
        feed_thread: bool = True,
    ) -> None:
        """``check_codecs=False`` skips the up-front codec check of the CPU path, leaving unreadable
        files to be found when DALI fails (slower, same error). ``feed_thread=False`` plans and reads
        each batch inside the external source, on the thread that calls ``next`` (for comparisons)."""
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        if device == "gpu":
            if not torch.cuda.is_available():
                raise RuntimeError("device='gpu' needs a CUDA GPU; use device='cpu' (VP8/VP9/MJPEG) or backend='pyav'")
            device_id = torch.cuda.current_device() if device_id is None else device_id
            torch_device = torch.device("cuda", device_id)
        else:
            if check_codecs:
                planner.restrict_codecs(DALI_CPU_CODECS, DALI_CPU_HINT)
            device_id = None  # a CPU-only pipeline must not touch CUDA
            torch_device = torch.device("cpu")
        super().__init__(planner, torch_device)
        self.device_kind = device
        self.device_id = device_id
        self.num_threads = num_threads
        self.prefetch = prefetch
        self.feed_thread = feed_thread
        self._pipe = None
        self._feeder: Feeder | None = None  # plans and reads the epoch's batches; None: the source ends
        self._pending: deque[tuple[int, list[ClipSpec | None]]] = deque()
        self._filler: ClipSpec | None = None
        self._facts: dict[str, StreamFacts | None] = {}  # per video, counted once per process

    def _new_pipeline(self, source: Callable[[], tuple], batch_size: int):
        return _build_pipeline(
            source,
            decode_device="mixed" if self.device_kind == "gpu" else "cpu",
            num_crops=self.planner.options.num_crops,
            crop_size=self.planner.options.crop_size,
            batch_size=batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=self.prefetch,
        )

    def _produce(self, index: int) -> tuple[list[ClipSpec | None], tuple[list[np.ndarray], ...]]:
        while True:
            specs = self.planner.batch(index)
            real = [s for s in specs if s is not None]
            if not real:  # DALI refuses empty batches: decode a filler and drop it
                self._filler = self._filler or self.planner.any_spec()
                real = [self._filler]
            try:
                return specs, _feed(real, self.planner.options.num_crops, self.reader, self._check_clip)
            except VideoError as err:  # unreadable file, damaged shard, frames past the decodable ones
                self.planner.mark_bad(err.path, err.reason)  # raises unless skip_corrupt; then re-plan
                if self._filler is not None and self._filler.path == err.path:
                    self._filler = None  # a bad filler is replaced, not retried forever

    def _source(self) -> tuple[list[np.ndarray], ...]:
        if self._feeder is None:
            raise StopIteration
        index, (specs, columns) = self._feeder.get()
        self._pending.append((index, specs))
        return columns

    def _check_clip(self, spec: ClipSpec, data: np.ndarray) -> ClipSpec:
        """Runs on the feeder thread, which alone touches ``_facts``."""
        if spec.path not in self._facts:
            self._facts[spec.path] = stream_facts(data)
        return check_clip(spec, self._facts[spec.path], nvdec=self.device_kind == "gpu")

    def __iter__(self) -> Iterator[Batch]:
        start = self._take_start_batch()
        self._restart(start)
        try:
            for _ in range(start, len(self)):
                outputs = self._run()
                _, specs = self._pending.popleft()
                yield self._collate(specs, self._to_torch(outputs, sum(s is not None for s in specs)))
        except GeneratorExit:  # the consumer stopped early
            self._end_epoch()
            raise
        except BaseException:
            self._close_feeder()
            self._pipe = None  # its state after an error is unknown: the next iteration builds a new one
            raise
        self._end_epoch()

    def _restart(self, index: int) -> None:
        self._close_feeder()
        if self._pipe is None:
            self._pipe = self._new_pipeline(self._source, self.batch_size)
        self._pending.clear()
        # inline: one batch planned and read per call of the source, as DALI asks for them
        depth = self.prefetch if self.feed_thread else 1
        self._feeder = Feeder(self._produce, index, len(self), depth, thread=self.feed_thread)

    def _close_feeder(self) -> None:
        if self._feeder is not None:
            self._feeder.close()
            self._feeder = None
        self.reader.close()

    def _end_epoch(self) -> None:
        """Let the source stop, consume what DALI prefetched, and rewind for the next iteration."""
        self._close_feeder()
        if self._pipe is None:
            return
        try:
            while True:
                self._pipe.run()
        except StopIteration:
            self._pipe.reset()
        except Exception:
            self._pipe = None  # a failed pipeline cannot be reused; the next iteration builds one
            raise

    def _run(self) -> tuple:
        while True:
            try:
                return self._pipe.run()
            except StopIteration as stop:
                raise DataError("DALI pipeline ended before the epoch did") from stop
            except RuntimeError as err:
                self._close_feeder()
                self._pipe = None
                index, specs = self._pending[0]
                culprit = self._find_culprit([s for s in specs if s is not None])
                if culprit is None:
                    files = ", ".join(s.path for s in specs if s is not None)
                    where = f"batch {index} of epoch {self.planner.epoch}"
                    raise DataError(f"DALI failed on {where} ({files}): {err}") from err
                self.planner.mark_bad(culprit.path, culprit.reason)  # raises unless skip_corrupt
                self._restart(index)

    def _find_culprit(self, specs: list[ClipSpec]) -> VideoError | None:
        """Decode each clip of a failed batch alone to find the video DALI cannot read."""
        num_crops = self.planner.options.num_crops
        for spec in specs:
            fed = iter([_feed([spec], num_crops, self.reader)])
            try:
                self._new_pipeline(lambda: next(fed), 1).run()
            except RuntimeError as err:
                detail = next((line for line in str(err).splitlines() if "failed" in line.lower()), str(err))
                return VideoError(spec.path, f"DALI cannot decode the video ({detail.strip()})", spec.where)
        return None

    def _to_torch(self, outputs: tuple, num_real: int) -> torch.Tensor:
        """DALI outputs, one per crop, (n, clips * T, 3, S, S) -> torch (num_real, V, T, 3, S, S)."""
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            stream = torch.cuda.current_stream(self.device)
            crops = []
            for out in outputs:
                tensor = out.as_tensor()
                buffer = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
                feed_ndarray(tensor, buffer, cuda_stream=stream)
                crops.append(buffer)
        else:
            # One copy out of DALI's reused buffers; numpy's allocation of large arrays (huge pages)
            # made this 3x faster than feed_ndarray into a fresh torch tensor on our 2-core machine.
            crops = [torch.from_numpy(out.as_array()) for out in outputs]
        n, num_frames = crops[0].shape[0], self.view_shape[1]
        if len(crops) == 1:  # training and 1-crop testing: views are the clips, no copy needed
            return crops[0].view(n, -1, num_frames, *crops[0].shape[2:])[:num_real]
        clips = torch.stack(crops, dim=1)[:num_real]  # (n, crops, clips * T, ...)
        clips = clips.view(clips.shape[0], clips.shape[1], -1, num_frames, *clips.shape[3:]).transpose(1, 2)
        return clips.reshape(clips.shape[0], -1, *clips.shape[3:])
