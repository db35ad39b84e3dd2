"""From the cluster to the edge (Section 4): a trained checkpoint as a streaming model.

``export`` writes an online graph with explicit shift caches (or the offline clip model) as ONNX or
TorchScript plus a sidecar JSON (``clip_graph`` is the offline graph; the online one is
:mod:`tsm_dist.streaming`'s, as is streaming an export frame by frame); ``runtime`` opens an exported model in
onnxruntime; ``frames`` decodes and preprocesses videos as the evaluation does; ``stream`` and ``early`` are
the ``tsm-dist stream`` and ``tsm-dist early-recognition`` commands.
"""
