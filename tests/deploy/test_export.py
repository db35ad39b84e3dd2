"""Exported graphs equal the PyTorch models: online ONNX frame by frame vs OnlineTSM and the offline
uni-directional model's causal per-frame logits; the offline export vs the clip model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tsm_dist.deploy.export import export_graph, sidecar_path
from tsm_dist.deploy.runtime import session
from tsm_dist.models import build_model
from tsm_dist.streaming import ExplicitCacheTSM, OnlineTSM
from tsm_dist.streaming.onnx_stream import OnnxStream
from tsm_dist.streaming.step import GRAPH_FORMS, split_applies

pytest.importorskip("onnxruntime")

# small widths for speed; the same code as the full models
SMALL = {"tsm8f_r50": dict(depth=18, width=16), "tsm8f_mbv2": dict(width=16)}
BOTTLENECK = dict(depth=50, width=8)  # the split form's bottleneck blocks and downsample convs
SIZE, T = 64, 5


def _calibrated(name: str, **options) -> torch.nn.Module:
    """A small model whose BN statistics are those of real activations: at initialisation, eval-mode BN
    with unit variance lets MobileNetV2's signal fade (depthwise convs), so every output would look alike
    and a wrong cache would go unseen."""
    torch.manual_seed(0)
    model = build_model(name, 7, num_frames=T, **{**SMALL[name], **options})
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the calibration batches
        model.train()
        model(torch.randn(4, T, 3, SIZE, SIZE))
        model.fc.weight.normal_(0, 0.1)
    return model.eval()


def _online_model(name: str) -> torch.nn.Module:
    if name == "r50_bottleneck":
        return _calibrated("tsm8f_r50", online=True, **BOTTLENECK)
    return _calibrated(name, online=True)


def _write(model, mode, tmp_path, fmt="onnx", with_shift=True, form="concat"):
    out = tmp_path / f"m.{fmt}"
    interface = export_graph(model, mode, fmt, out, SIZE, with_shift=with_shift, form=form)
    sidecar_path(out).write_text(json.dumps({"mode": mode, "format": fmt, **interface}))
    return out, interface


@pytest.mark.parametrize("name, form", [("tsm8f_r50", "concat"), ("tsm8f_mbv2", "concat"), ("tsm8f_r50", "mask"),
                                        ("tsm8f_mbv2", "mask"), ("tsm8f_r50", "sub"), ("tsm8f_mbv2", "sub"),
                                        ("tsm8f_r50", "split"), ("tsm8f_mbv2", "split"), ("r50_bottleneck", "concat"),
                                        ("r50_bottleneck", "split")])
def test_online_onnx_equals_online_tsm_and_causal_offline(name: str, form: str, tmp_path) -> None:
    model = _online_model(name)
    clips = torch.randn(2, T, 3, SIZE, SIZE)
    with torch.no_grad():
        offline = model.frame_logits(clips)  # frame t sees frames <= t only (uni-directional)
    online = OnlineTSM(model)
    streamed_torch = torch.stack([online(clips[:, t]) for t in range(T)], 1)
    online.reset()
    path, interface = _write(model, "online", tmp_path, form=form)
    assert len(interface["caches"]) == len(model.shift_modules()) > 0
    stream = OnnxStream(path)
    streamed_onnx = np.stack([stream(clips[:, t].numpy()) for t in range(T)], 1)
    # fp32: onnxruntime folds each BN into its conv (as the split form does before export), which in a
    # 50-layer net with calibrated BN statistics moves logits of magnitude ~5 by up to ~3e-4, in every form
    tol = 1e-4 if name in SMALL else 1e-4 * float(np.abs(offline.numpy()).max())
    assert np.abs(streamed_onnx - streamed_torch.numpy()).max() <= tol
    assert np.abs(streamed_onnx - offline.numpy()).max() <= tol
    # the caches carry the past: without them frame 1 would differ from the offline model
    stream.reset()
    stream(clips[:, 0].numpy())
    stream.reset()
    alone = stream(clips[:, 1].numpy())
    assert np.abs(alone - offline[:, 1].numpy()).max() > 1e-3
    assert stream.cache_nbytes() == sum(4 * 2 * np.prod(c["shape"][1:]) for c in interface["caches"])
    _, ops = _graph_facts(path)
    if form in ("mask", "sub"):  # no slice or concatenation of a block input at the shift points
        assert ops["Slice"] == ops["Concat"] == ops["Split"] == 0
    if form == "split":  # BN folded; ResNet: one concatenation, of the last block's two parts; MobileNetV2: none
        assert ops["BatchNormalization"] == 0 and ops["Slice"] == ops["Split"] == 0
        assert ops["Concat"] == (0 if name == "tsm8f_mbv2" else 1)


@pytest.mark.parametrize("name", list(SMALL))
def test_offline_onnx_equals_clip_model(name: str, tmp_path) -> None:
    model = _calibrated(name)  # bi-directional, as trained offline
    with torch.no_grad():
        clips = torch.randn(3, T, 3, SIZE, SIZE)
        expected = model(clips).numpy()
    path, _ = _write(model, "offline", tmp_path)
    got = session(path).run(["logits"], {"clips": clips.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4


def test_torchscript_online_equals_onnx_interface(tmp_path) -> None:
    model = _online_model("tsm8f_mbv2")
    path, interface = _write(model, "online", tmp_path, fmt="torchscript")
    scripted = torch.jit.load(str(path))
    clips = torch.randn(1, T, 3, SIZE, SIZE)
    caches = [torch.zeros(1, *c["shape"][1:]) for c in interface["caches"]]
    outs = []
    for t in range(T):
        logits, *caches = scripted(clips[:, t], *caches)
        outs.append(logits)
    with torch.no_grad():
        assert (torch.stack(outs, 1) - model.frame_logits(clips)).abs().max() <= 1e-4


def test_explicit_cache_names_and_shapes() -> None:
    model = build_model("tsm8f_mbv2", 4, online=True).eval()  # full width, MobileNetV2 at 224
    shapes = ExplicitCacheTSM(model).cache_shapes((1, 3, 224, 224))
    # the official online demo's ten shift buffers
    assert shapes == [(1, 3, 56, 56), (1, 4, 28, 28), (1, 4, 28, 28), (1, 8, 14, 14), (1, 8, 14, 14),
                      (1, 8, 14, 14), (1, 12, 14, 14), (1, 12, 14, 14), (1, 20, 7, 7), (1, 20, 7, 7)]
    assert ExplicitCacheTSM(model).cache_names()[:2] == ["cache_00", "cache_01"]


def test_same_network_without_shift_has_no_caches(tmp_path) -> None:
    model = _online_model("tsm8f_r50")
    path, interface = _write(model, "online", tmp_path, with_shift=False)
    assert interface["caches"] == []
    frame = torch.randn(1, 3, SIZE, SIZE)
    tsn = build_model("tsn8f_r50", 7, num_frames=1, **SMALL["tsm8f_r50"]).eval()  # ResNet without shift
    tsn.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = tsn(frame.unsqueeze(1)).numpy()
    got = session(path).run(["logits"], {"frame": frame.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4


def _graph_facts(path) -> tuple[dict[str, list], dict[str, int]]:
    """(every input's and output's dims, node count per op type) of an ONNX file."""
    import collections

    import onnx

    graph = onnx.load(str(path)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*graph.input, *graph.output)}
    return dims, collections.Counter(n.op_type for n in graph.node)


@pytest.mark.parametrize("name", list(SMALL))
def test_graphs_are_static_but_the_batch(name: str, tmp_path) -> None:
    """Converters and runtimes take the graphs as they are: every size fixed but the batch, the fold a
    constant (no Shape -> Gather -> Div at each shift point)."""
    model = _online_model(name)
    forms = [f for f in GRAPH_FORMS if f != "split" or split_applies(model)]
    for mode, with_shift, form in (*(("online", True, f) for f in forms), ("online", False, "concat"),
                                   ("offline", True, "concat")):
        path, interface = _write(model, mode, tmp_path / f"{mode}_{with_shift}_{form}", with_shift=with_shift,
                                 form=form)
        dims, ops = _graph_facts(path)
        assert all(d[0] == "batch" and all(isinstance(v, int) and v > 0 for v in d[1:]) for d in dims.values()), dims
        assert dims["logits"] == ["batch", 7] and interface["shapes"]["logits"] == ["batch", 7]
        assert ops["Div"] == 0
        if mode == "online":
            assert ops["Shape"] == 0 and ops["Gather"] == 0 and ops["Reshape"] == 0
            if form == "concat" and with_shift:
                # one cache out and one rest slice, one concatenation per shift point; nothing else
                assert (ops["Slice"], ops["Concat"]) == (2 * len(interface["caches"]), len(interface["caches"]))
            for cache in interface["caches"]:
                assert dims[cache["input"]] == dims[cache["output"]] == cache["shape"]
        else:  # only the zero frame at the clip's border takes its size from the (dynamic) batch
            assert ops["Shape"] == len(model.shift_modules())
