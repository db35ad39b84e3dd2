"""GPU invariants checked on CPU: channels-last tensors as Horovod sees them, the memory format a model
runs in, and the torch engine's device chosen before its NCCL process group exists."""
from __future__ import annotations

import io

import pytest
import torch

from tsm_dist.config import EngineConfig
from tsm_dist.distributed.engine import Engine, _state_bytes, _state_from_bytes
from tsm_dist.distributed.gradients import DenseViewCompressor, dense_permutation, dense_view
from tsm_dist.training.memory_format import model_memory_format, to_memory_format
from tsm_dist.models import build_model


@pytest.mark.parametrize("shape,memory_format", [((4, 6, 5, 3), torch.channels_last),
                                                  ((2, 6, 3, 4, 5), torch.channels_last_3d),
                                                  ((8, 16, 1, 1), torch.channels_last)])
def test_dense_view_of_a_channels_last_tensor_is_contiguous_and_shares_storage(shape, memory_format):
    t = torch.randn(shape).to(memory_format=memory_format)
    assert not t.is_contiguous() or shape[2:] == (1, 1)
    view = dense_view(t)
    assert view.is_contiguous() and view.data_ptr() == t.data_ptr() and view.numel() == t.numel()
    view.mul_(2)  # writes reach the original: an in-place collective on the view is one on the tensor
    assert torch.equal(view.sum(), t.sum())


def test_dense_view_leaves_contiguous_tensors_alone_and_refuses_overlapping_ones():
    t = torch.randn(3, 4)
    assert dense_permutation(t) is None and dense_view(t) is t
    with pytest.raises(ValueError, match="not dense"):
        dense_permutation(torch.randn(3, 1).expand(3, 4).t())


@pytest.mark.parametrize("compression", ["none", "fp16"])
def test_dense_view_compressor_round_trip_keeps_strides_with_horovods_compressors(compression):
    hvd = pytest.importorskip("horovod.torch")
    inner = getattr(hvd.Compression, compression)
    grad = torch.randn(8, 6, 3, 3).to(memory_format=torch.channels_last)
    wire, ctx = DenseViewCompressor(inner).compress(grad)
    assert wire.is_contiguous()  # what Horovod's allreduce_async_ demands
    assert wire.dtype == (torch.float16 if compression == "fp16" else torch.float32)
    back = DenseViewCompressor(inner).decompress(wire, ctx)
    assert back.shape == grad.shape and back.stride() == grad.stride()
    assert torch.allclose(back, grad, atol=1e-2 if compression == "fp16" else 0)
    # what Horovod's synchronize does with the result: the gradient keeps its parameter's layout
    target = grad.clone()
    target.set_(back)
    assert target.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name,expected", [("tsm8f_r50", "channels_last"), ("i3d3x1x1_r50", "channels_last_3d")])
def test_model_memory_format_is_what_the_weights_are_in(name, expected):
    model = build_model(name, 4, num_frames=4, depth=18, width=8)
    assert model_memory_format(model) == "contiguous"
    assert to_memory_format(model, False)[1] == "contiguous"
    converted, fmt = to_memory_format(model, True)
    assert fmt == expected == model_memory_format(converted)


def test_torch_engine_pins_its_gpu_before_creating_the_nccl_process_group(monkeypatch):
    """NCCL binds a communicator to the current device at init: set_device must come first, and the
    process group is told its device (eager init). CUDA is faked: only the order of calls is checked."""
    import torch.distributed as dist

    events = []

    class Stop(Exception):
        pass

    def init_process_group(backend, init_method=None, timeout=None, world_size=-1, rank=-1, device_id=None):
        events.append(("init_process_group", backend, device_id))
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: events.append(("set_device", index)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    for key, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(Stop):
        Engine(EngineConfig(name="torch")).init()
    assert events == [("set_device", 1), ("init_process_group", "nccl", torch.device("cuda", 1))]


def test_optimizer_state_travels_as_bytes_loaded_onto_the_receivers_device():
    model = torch.nn.Conv2d(4, 4, 3).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4, 5, 5)).sum().backward()
    opt.step()
    payload = _state_bytes(opt.state_dict())
    assert isinstance(payload, bytes)
    seen = []
    state = torch.load(io.BytesIO(payload), weights_only=False,
                       map_location=lambda storage, location: seen.append(location) or storage)
    assert seen and set(seen) == {"cpu"}  # saved where it was (a GPU rank 0 saves "cuda:0")
    momentum = state["state"][0]["momentum_buffer"]
    assert momentum.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(momentum, opt.state_dict()["state"][0]["momentum_buffer"])
    # what a receiving rank loads: on its own device (here the meta device stands in for cuda:N)
    received = _state_from_bytes(payload, torch.device("meta"))["state"][0]["momentum_buffer"]
    assert received.device.type == "meta" and received.shape == momentum.shape


@pytest.mark.multirank
def test_a_gradient_missing_on_one_rank_is_summed_in_the_parameters_order(tmp_path):
    """Horovod zero-fills a missing gradient as a contiguous tensor while the other rank sends its
    channels-last order: the engine's optimizer makes both ranks send the parameter's order. The same
    worker with Horovod's own optimizer shows the scramble, so the check can fail."""
    from conftest import PYTHON, REPO, horovodrun, run_bounded

    worker = str(REPO / "tests" / "workers" / "missing_grad_worker.py")
    ours = run_bounded(horovodrun(2, PYTHON, worker), timeout=180, cwd=tmp_path)
    assert "RANKS_AGREE=True STRIDES_KEPT=True" in ours.stdout, ours.stdout[-3000:]
    raw = run_bounded(horovodrun(2, PYTHON, worker, "--raw-horovod"), timeout=180, cwd=tmp_path)
    assert "RANKS_AGREE=False" in raw.stdout, raw.stdout[-3000:]


def test_element_order_ignores_size_one_dims():
    from tsm_dist.distributed.gradients import element_order

    weight = torch.randn(8, 16, 1, 1)
    assert element_order(weight) == element_order(weight.to(memory_format=torch.channels_last)) == (0, 1)
    conv = torch.randn(8, 16, 3, 3)
    assert element_order(conv) == (0, 1, 2, 3) and element_order(conv.to(memory_format=torch.channels_last)) == (0, 2, 3, 1)
