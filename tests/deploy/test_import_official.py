"""Checkpoints of the official TSM code (github.com/mit-han-lab/temporal-shift-module) import and compute
what the official networks compute.

The official networks are written here as references, following its code: ops/temporal_shift.py (the
shift, the ``.net`` wrapper, make_temporal_shift's placements), ops/models.py (the TSN wrapper:
``base_model``, the classifier replaced by Dropout, ``new_fc``, average consensus), torchvision's ResNet
(v1.5, the stride on the 3x3) and archs/mobilenet_v2.py / online_demo/mobilenet_v2_tsm.py (the flat
MobileNetV2, the online demo's shift buffers). Their state dicts, saved as main.py and the demo save
them, are the files; nothing is downloaded.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tsm_dist.cli import main as cli
from tsm_dist.deploy.export import trained_model
from tsm_dist.models import build_model
from tsm_dist.streaming import OnlineTSM


# -- ops/temporal_shift.py -----------------------------------------------------------------------
class OfficialShift(nn.Module):
    def __init__(self, net: nn.Module, n_segment: int, n_div: int) -> None:
        super().__init__()
        self.net, self.n_segment, self.fold_div = net, n_segment, n_div

    def forward(self, x):
        nt, c, h, w = x.size()
        x = x.view(nt // self.n_segment, self.n_segment, c, h, w)
        fold = c // self.fold_div
        out = torch.zeros_like(x)
        out[:, :-1, :fold] = x[:, 1:, :fold]  # shift left
        out[:, 1:, fold: 2 * fold] = x[:, :-1, fold: 2 * fold]  # shift right
        out[:, :, 2 * fold:] = x[:, :, 2 * fold:]  # not shift
        return self.net(out.view(nt, c, h, w))


# -- torchvision's ResNet (names and v1.5 strides) -----------------------------------------------
class TVBasic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TVBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class TVResNet(nn.Module):
    def __init__(self, block, layers, width=64, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for s, n in enumerate(layers):
            planes, blocks = width * 2 ** s, []
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                down = None
                if stride != 1 or cin != planes * block.expansion:
                    down = nn.Sequential(nn.Conv2d(cin, planes * block.expansion, 1, stride, bias=False),
                                         nn.BatchNorm2d(planes * block.expansion))
                blocks.append(block(cin, planes, stride, down))
                cin = planes * block.expansion
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def make_temporal_shift(net, n_segment, n_div, place, n_round=1):
    for s in range(1, 5):
        blocks = list(getattr(net, f"layer{s}").children())
        for i, b in enumerate(blocks):
            if place == "block":
                blocks[i] = OfficialShift(b, n_segment, n_div)
            elif i % n_round == 0:
                b.conv1 = OfficialShift(b.conv1, n_segment, n_div)
        setattr(net, f"layer{s}", nn.Sequential(*blocks))


# -- archs/mobilenet_v2.py and online_demo/mobilenet_v2_tsm.py -----------------------------------
def conv_bn(inp, oup, stride):
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU6(inplace=True))


def conv_1x1_bn(inp, oup):
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU6(inplace=True))


def make_divisible(x, divisible_by=8):
    return int(np.ceil(x * 1. / divisible_by) * divisible_by)


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden_dim = int(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers = [] if expand_ratio == 1 else [
            nn.Conv2d(inp, hidden_dim, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden_dim), nn.ReLU6(inplace=True)]
        self.conv = nn.Sequential(
            *layers,
            nn.Conv2d(hidden_dim, hidden_dim, 3, stride, 1, groups=hidden_dim, bias=False),
            nn.BatchNorm2d(hidden_dim), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class InvertedResidualWithShift(InvertedResidual):
    def forward(self, x, shift_buffer):
        c = x.size(1)
        x1, x2 = x[:, : c // 8], x[:, c // 8:]
        return x + self.conv(torch.cat((shift_buffer, x2), dim=1)), x1


SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


class MobileNetV2(nn.Module):
    """archs/mobilenet_v2.py (online=False) or online_demo/mobilenet_v2_tsm.py (online=True)."""

    def __init__(self, n_class=1000, width_mult=1., online=False):
        super().__init__()
        input_channel, last_channel = 32, 1280
        self.last_channel = make_divisible(last_channel * width_mult) if width_mult > 1.0 else last_channel
        features = [conv_bn(3, input_channel, 2)]
        global_idx, shift_block_idx = 0, [2, 4, 5, 7, 8, 9, 11, 12, 14, 15]
        for t, c, n, s in SETTING:
            output_channel = make_divisible(c * width_mult) if t > 1 else c
            for i in range(n):
                block = InvertedResidualWithShift if online and global_idx in shift_block_idx else InvertedResidual
                features.append(block(input_channel, output_channel, s if i == 0 else 1, expand_ratio=t))
                global_idx += 1
                input_channel = output_channel
        features.append(conv_1x1_bn(input_channel, self.last_channel))
        self.features = nn.ModuleList(features) if online else nn.Sequential(*features)
        self.classifier = nn.Linear(self.last_channel, n_class)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2. / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))

    def forward(self, x, *shift_buffer):
        if isinstance(self.features, nn.Sequential):
            return self.classifier(self.features(x).mean(3).mean(2))
        out_buffer = []
        for f in self.features:
            if isinstance(f, InvertedResidualWithShift):
                x, s = f(x, shift_buffer[len(out_buffer)])
                out_buffer.append(s)
            else:
                x = f(x)
        return (self.classifier(x.mean(3).mean(2)), *out_buffer)


# -- ops/models.py -------------------------------------------------------------------------------
class OfficialTSN(nn.Module):
    """TSN(num_class, num_segments, 'RGB', base_model=..., dropout>0, is_shift=...) in eval mode."""

    def __init__(self, base_model, last_layer_name, num_class, num_segments):
        super().__init__()
        self.base_model, self.num_segments = base_model, num_segments
        feature_dim = getattr(base_model, last_layer_name).in_features
        setattr(base_model, last_layer_name, nn.Dropout(p=0.5))
        self.new_fc = nn.Linear(feature_dim, num_class)

    def forward(self, x):
        base_out = self.new_fc(self.base_model(x.view((-1, 3) + x.size()[-2:])))
        return base_out.view((-1, self.num_segments) + base_out.size()[1:]).mean(1)


def randomize_bn(net: nn.Module, run) -> nn.Module:
    """Trained-looking BN: random affine parameters, statistics of real activations (``run(net)`` on
    random frames), so that every layer's weights matter and the signal reaches the classifier."""
    g = torch.Generator().manual_seed(5)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batch
    net.train()
    with torch.no_grad():
        run(net)
    for m in bns:
        m.momentum = 0.1
    return net.eval()


def save_main_py(net: nn.Module, path: Path, arch: str) -> Path:
    """As main.py's save_checkpoint does: DataParallel names, the optimizer, the best precision."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    torch.save({"epoch": 50, "arch": arch, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()},
                "optimizer": optimizer.state_dict(), "best_prec1": 71.2}, path)
    return path


def official_resnet_tsm(depth, width, classes, segments, fold, place, n_round=1, shift=True):
    torch.manual_seed(0)
    block, layers = {18: (TVBasic, (2, 2, 2, 2)), 50: (TVBottleneck, (3, 4, 6, 3))}[depth]
    base = TVResNet(block, layers, width)
    if shift:
        make_temporal_shift(base, segments, fold, place, n_round)
    return randomize_bn(OfficialTSN(base, "fc", classes, segments), lambda n: n(torch.randn(2, segments, 3, 64, 64)))


def official_mobilenet_tsm(classes, segments, fold):
    torch.manual_seed(0)
    base = MobileNetV2()
    for m in base.modules():
        if isinstance(m, InvertedResidual) and len(m.conv) == 8 and m.use_res_connect:
            m.conv[0] = OfficialShift(m.conv[0], segments, fold)
    return randomize_bn(OfficialTSN(base, "classifier", classes, segments),
                        lambda n: n(torch.randn(2, segments, 3, 64, 64)))


def imported(tmp_path: Path, source: Path, *args: str) -> torch.nn.Module:
    out = tmp_path / "our.pt"
    assert cli(["import-official", str(source), "--out", str(out), *args]) == 0
    model, _ = trained_model(str(out), None, [])  # as `tsm-dist export` builds it: from the recorded config
    return model


# -- the tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("depth,width,place,name", [
    (50, 16, "blockres", "TSM_kinetics_RGB_resnet50_shift8_blockres_avg_segment8_e50.pth"),
    (18, 16, "block", "TSM_something_RGB_resnet18_shift4_block_avg_segment4_e45.pth"),
])
def test_main_py_resnet_tsm_equals_the_official_network(tmp_path, capsys, depth, width, place, name) -> None:
    fold, segments = (8, 8) if "shift8" in name else (4, 4)
    official = official_resnet_tsm(depth, width, 7, segments, fold, place)
    path = save_main_py(official, tmp_path / name, f"resnet{depth}")
    model = imported(tmp_path, path)
    sd_keys = len(official.state_dict())
    out = capsys.readouterr().out
    assert f"{sd_keys} tensors -> tsm8f_r50" in out and "shift wrapper .net -> (none)" in out
    assert (model.num_frames, model.shift_modules()[0].fold_div, model.fc.out_features) == (segments, fold, 7)
    assert all(s.direction == "bi" for s in model.shift_modules())
    shift_place = {"blockres": "residual", "block": "inplace"}[place]
    assert model.layer1[0].shift_place == shift_place
    clips = torch.randn(2, segments, 3, 64, 64)
    with torch.no_grad():
        want, got = official(clips), model(clips)
    assert (got - want).abs().max() <= 1e-5
    # the shift matters here: the same weights without it (TSN) give another answer
    tsn = build_model("tsn8f_r50", 7, num_frames=segments, depth=depth, width=width).eval()
    tsn.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (tsn(clips) - want).abs().max() > 1e-3


def test_main_py_resnet_tsn_imports_as_tsn(tmp_path) -> None:
    official = official_resnet_tsm(18, 16, 5, 5, 8, "blockres", shift=False)
    model = imported(tmp_path, save_main_py(official, tmp_path / "TSM_kinetics_RGB_resnet18_avg_segment5_e50.pth",
                                            "resnet18"))
    assert model.name == "tsn8f_r50" and model.num_frames == 5
    clips = torch.randn(1, 5, 3, 32, 32)
    with torch.no_grad():
        assert (model(clips) - official(clips)).abs().max() <= 1e-5


def test_main_py_mobilenet_tsm_equals_the_official_network(tmp_path) -> None:
    official = official_mobilenet_tsm(6, 8, 8)
    path = save_main_py(official, tmp_path / "TSM_kinetics_RGB_mobilenetv2_shift8_blockres_avg_segment8_e100_dense.pth",
                        "mobilenetv2")
    model = imported(tmp_path, path)
    assert (model.name, model.num_frames, len(model.shift_modules())) == ("tsm8f_mbv2", 8, 10)
    assert all(s.direction == "bi" for s in model.shift_modules())
    clips = torch.randn(1, 8, 3, 64, 64)
    with torch.no_grad():
        assert (model(clips) - official(clips)).abs().max() <= 1e-5


@pytest.fixture()
def demo_file(tmp_path: Path) -> tuple[Path, MobileNetV2]:
    """The online demo's mobilenetv2_jester_online.pth.tar: a bare state_dict, 27 Jester classes."""
    torch.manual_seed(0)
    official = randomize_bn(MobileNetV2(n_class=27, online=True),
                            lambda n: official_stream(n, torch.randn(8, 2, 3, 64, 64)))
    path = tmp_path / "mobilenetv2_jester_online.pth.tar"
    torch.save(official.state_dict(), path)
    return path, official


def official_stream(official: MobileNetV2, frames: torch.Tensor) -> torch.Tensor:
    """online_demo/main.py: every frame with the previous frame's shift buffers, zeros at first."""
    sizes = [(3, 16), (4, 8), (4, 8), (8, 4), (8, 4), (8, 4), (12, 4), (12, 4), (20, 2), (20, 2)]  # at 64x64
    buffers = [torch.zeros(frames.shape[0], c, s, s) for c, s in sizes]
    outs = []
    with torch.no_grad():
        for t in range(frames.shape[1]):
            logits, *buffers = official(frames[:, t], *buffers)
            outs.append(logits)
    return torch.stack(outs, 1)


def test_online_demo_streams_equal_to_the_official_demo(tmp_path, capsys, demo_file) -> None:
    path, official = demo_file
    assert len(official.state_dict()) == 314  # the demo file's tensor count (issue #28)
    model = imported(tmp_path, path)
    out = capsys.readouterr().out
    assert "the online demo's flat MobileNetV2, 314 tensors -> tsm8f_mbv2" in out and "online=True" in out
    assert "classifier -> fc: 2" in out
    frames = torch.randn(2, 6, 3, 64, 64)
    want = official_stream(official, frames)
    online = OnlineTSM(model)
    got = torch.stack([online(frames[:, t]) for t in range(frames.shape[1])], 1)
    assert (got - want).abs().max() <= 1e-5
    assert (want[:, 1:] - want[:, :1]).abs().max() > 1e-3  # frames differ: a wrong cache would show


def test_model_pretrained_takes_official_files_as_they_are(tmp_path, demo_file) -> None:
    path, official = demo_file
    model = build_model("tsm8f_mbv2", 27, online=True, pretrained=str(path)).eval()
    frames = torch.randn(1, 3, 3, 64, 64)
    online = OnlineTSM(model)
    got = torch.stack([online(frames[:, t]) for t in range(3)], 1)
    assert (got - official_stream(official, frames)).abs().max() <= 1e-5
    # fine-tuning on another class count keeps the backbone and leaves the new classifier alone
    resnet = official_resnet_tsm(18, 16, 7, 8, 8, "blockres")
    main_py = save_main_py(resnet, tmp_path / "TSM_x_RGB_resnet18_shift8_blockres_avg_segment8_e1.pth", "resnet18")
    tuned = build_model("tsm8f_r50", 3, depth=18, width=16, online=True, pretrained=str(main_py))
    assert torch.equal(tuned.layer1[0].conv1.weight, resnet.base_model.layer1[0].conv1.net.weight)


def test_imported_demo_exports_and_streams_in_onnxruntime(tmp_path, demo_file) -> None:
    pytest.importorskip("onnxruntime")
    from tsm_dist.streaming.onnx_stream import OnnxStream

    path, official = demo_file
    ours = tmp_path / "our.pt"
    assert cli(["import-official", str(path), "--out", str(ours)]) == 0
    onnx_path = tmp_path / "jester.onnx"
    assert cli(["export", "--checkpoint", str(ours), "--out", str(onnx_path), "--size", "64"]) == 0
    stream = OnnxStream(onnx_path, threads=1)
    frames = torch.randn(1, 4, 3, 64, 64)
    got = np.stack([stream(frames[:, t].numpy()) for t in range(4)], 1)
    assert np.abs(got - official_stream(official, frames).numpy()).max() <= 1e-4
    assert cli(["stream", "--model", str(onnx_path), "--video", "synthetic:1", "--quiet"]) == 0
    meta = json.loads(Path(str(onnx_path) + ".json").read_text())
    assert meta["model_options"]["online"] is True and len(meta["classes"]) == 27


def test_eval_runs_on_imported_weights(tmp_path, synthetic, demo_file) -> None:
    path, _ = demo_file
    ours = tmp_path / "our.pt"
    assert cli(["import-official", str(path), "--out", str(ours)]) == 0
    config = Path(__file__).parents[2] / "configs" / "synthetic_tsm_mbv2.yaml"
    result = tmp_path / "eval.json"
    assert cli(["eval", "--config", str(config), "--checkpoint", str(ours), "--json", str(result),
                "--set", f"data.root={synthetic.root}", "--set", "model.num_classes=27", "--set", "model.width=32",
                "--set", "data.crop_size=32", "--set", "data.scale_size=32", "--set", "engine.name=torch",
                "--set", "log.wandb=disabled"]) == 0
    (row,) = json.loads(result.read_text())["checkpoints"]
    assert row["num_samples"] == len(Path(synthetic.val_list).read_text().splitlines()) and row["loss"] > 0


def _refused(capsys, *argv: str) -> tuple[int, str]:
    code = cli(["import-official", *argv])
    return code, capsys.readouterr().err.strip()


def test_refusals_are_one_line_naming_the_cause(tmp_path, capsys, demo_file) -> None:
    demo, official = demo_file
    out = str(tmp_path / "our.pt")
    code, err = _refused(capsys, str(demo), "--out", out, "--fold-div", "4")
    assert code == 5 and "online demo's code says fold_div=8" in err and len(err.splitlines()) == 1
    wide = tmp_path / "mobilenetv2_140.pth"
    torch.save(MobileNetV2(n_class=27, width_mult=1.4, online=True).state_dict(), wide)
    code, err = _refused(capsys, str(wide), "--out", out)
    assert code == 5 and "features.2.conv.2.weight has shape (40, 96, 1, 1), tsm8f_mbv2 needs (24, 96, 1, 1) (another width" in err
    resnet = official_resnet_tsm(18, 16, 4, 8, 8, "blockres")
    name = "TSM_kinetics_RGB_resnet18_shift8_blockres_avg_segment8_e50.pth"
    main_py = save_main_py(resnet, tmp_path / name, "resnet18")
    code, err = _refused(capsys, str(main_py), "--out", out, "--num-frames", "16")
    assert code == 5 and "the file name says num_frames=8, --num-frames 16" in err
    code, err = _refused(capsys, str(save_main_py(resnet, tmp_path / "a.pth", "resnet50")), "--out", out)
    assert code == 5 and "arch 'resnet50' recorded, the tensors are a resnet18" in err
    every_other = official_resnet_tsm(18, 16, 4, 8, 8, "blockres", n_round=2)
    code, err = _refused(capsys, str(save_main_py(every_other, tmp_path / "b.pth", "resnet18")), "--out", out)
    assert code == 5 and "shifts 4 blocks, tsm_dist shifts 8" in err and "layer1.1 differs" in err
    state = {f"module.{k}": v for k, v in resnet.state_dict().items()}
    tpool = {k.replace("base_model.layer2.", "base_model.layer2.net."): v for k, v in state.items()}
    torch.save({"state_dict": tpool}, tmp_path / "c.pth")
    code, err = _refused(capsys, str(tmp_path / "c.pth"), "--out", out)
    assert code == 5 and "temporal pooling" in err
    torch.save({"state_dict": {"module.base_model.inception_3a_1x1.weight": torch.zeros(64, 192, 1, 1),
                               "module.new_fc.weight": torch.zeros(4, 1024)}}, tmp_path / "d.pth")
    code, err = _refused(capsys, str(tmp_path / "d.pth"), "--out", out)
    assert code == 5 and "another architecture (BNInception?)" in err
    torch.save(build_model("tsm8f_r50", 4, depth=18, width=8).state_dict(), tmp_path / "ours.pth")
    code, err = _refused(capsys, str(tmp_path / "ours.pth"), "--out", out)
    assert code == 5 and "not in an official TSM layout" in err
    code, err = _refused(capsys, str(main_py), "--out", out, "--num-frames", "0")
    assert code == 5  # the name's 8 contradicts it first
    code, err = _refused(capsys, str(demo), "--out", out, "--num-frames", "0")
    assert code == 2 and "num_frames=0" in err
    assert not Path(out).exists()
