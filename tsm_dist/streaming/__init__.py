"""Streaming: the uni-directional TSM one frame at a time (Section 4, Fig. 4), in one home.

Every shift point of an online model keeps the 1/8 of its input channels that the next frame shifts in.
Where those caches live decides the rest, and all of it is here:

* :mod:`~tsm_dist.streaming.slots`: the cache slot that stands in for a shift point (the channels it shifts in
  come from an input, the frame's own leave as an output) in its forms: a swap in place (PyTorch), slices and a
  concatenation, or convs only (graphs);
* :mod:`~tsm_dist.streaming.split`: ResNet's "split" graph form, block inputs carried as cache part and rest;
  :mod:`~tsm_dist.streaming.split_mbv2` MobileNetV2's;
* :mod:`~tsm_dist.streaming.step`: :class:`ExplicitCacheTSM`, one time step as a pure function
  ``(frame, *caches) -> (logits, *new caches)`` (what ``tsm-dist export`` traces);
* :mod:`~tsm_dist.streaming.online`: :class:`OnlineTSM`, that step with the caches carried between calls in
  PyTorch;
* :mod:`~tsm_dist.streaming.onnx_stream`: :class:`OnnxStream`, an exported step with the caches carried between
  onnxruntime calls.

The models themselves know nothing of streaming: a :class:`~tsm_dist.models.temporal_shift.TemporalShift` is
the shift of whole clips, and streaming replaces it in a copy of the model that shares its weights.
"""
from tsm_dist.streaming.online import OnlineTSM
from tsm_dist.streaming.step import GRAPH_FORMS, ExplicitCacheTSM

__all__ = ["GRAPH_FORMS", "ExplicitCacheTSM", "OnlineTSM"]
