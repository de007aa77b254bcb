import pytest
import torch

import lorakit.training.hardware as hardware
from lorakit.training.hardware import default_compute_dtype, default_device, resolve_compute_dtype


@pytest.fixture
def fresh_detection():
    hardware.bf16_probe.cache_clear()
    yield
    hardware.bf16_probe.cache_clear()


@pytest.mark.parametrize(
    ("value", "dtype"),
    [("fp32", torch.float32), ("float32", torch.float32), ("bf16", torch.bfloat16),
     ("BFloat16", torch.bfloat16), ("fp16", torch.float16), (" float16 ", torch.float16),
     (torch.bfloat16, torch.bfloat16)],
)
def test_resolve_names(value, dtype):
    assert resolve_compute_dtype(value, "cpu") is dtype


@pytest.mark.parametrize("value", [None, "auto", "AUTO"])
def test_auto_is_the_hardware_choice(value):
    assert resolve_compute_dtype(value, "cpu") is default_compute_dtype("cpu")


@pytest.mark.parametrize("value", ["fp8", "int4", "", torch.float64, 32])
def test_unknown_dtype_is_named_with_the_fix(value):
    with pytest.raises(ValueError, match="compute dtype") as error:
        resolve_compute_dtype(value, "cpu")
    assert str(value) in str(error.value) and "float32" in str(error.value)  # names value and fix


@pytest.mark.parametrize(("fast", "dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_dtype_follows_bf16_detection(monkeypatch, fast, dtype):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: fast)
    assert default_compute_dtype("cpu") is dtype
    assert default_compute_dtype(torch.device("cpu")) is dtype


@pytest.mark.parametrize(("bf16", "dtype"), [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_dtype(monkeypatch, bf16, dtype):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert default_compute_dtype("cuda") is dtype


def test_other_devices_compute_in_fp32():
    assert default_compute_dtype("mps") is torch.float32
    assert default_compute_dtype("meta") is torch.float32


def test_no_native_bf16_flag_means_slow_without_timing(monkeypatch, fresh_detection):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(hardware, "_matmul_seconds", pytest.fail)
    assert hardware.cpu_has_fast_bf16() is False


@pytest.mark.parametrize("flags", [{"avx512f", "avx512_bf16"}, {"amx_bf16"}, {"asimd", "bf16"}, None])
@pytest.mark.parametrize(("bf16_seconds", "fast"), [(0.5, True), (1.9, True), (2.1, False), (300.0, False)])
def test_native_flag_is_confirmed_by_timing(monkeypatch, fresh_detection, flags, bf16_seconds, fast):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    seconds = {torch.float32: 1.0, torch.bfloat16: bf16_seconds}
    monkeypatch.setattr(hardware, "_matmul_seconds", lambda dtype: seconds[dtype])
    assert hardware.cpu_has_fast_bf16() is fast


def test_detection_on_this_machine_is_consistent(fresh_detection):
    flags = hardware.cpu_flags()
    fast = hardware.cpu_has_fast_bf16()
    assert isinstance(fast, bool)
    if flags is not None and not flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        assert not fast


def test_default_device_is_available():
    device = default_device()
    torch.empty(1, device=device)
    if not torch.cuda.is_available():
        assert device.type in ("cpu", "mps")
