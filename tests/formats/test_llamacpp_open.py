"""How lorakit opens a llama.cpp model (`lorakit.formats.llamacpp.open_model`): on a CPU that reports AMX, with
llama.cpp's extra (AMX) buffer types off, since llama-cpp-python 0.3.36 dies with SIGILL in its AMX matmul on
such a machine; elsewhere, or with LORAKIT_LLAMA_CPP_AMX=1, as llama-cpp-python opens it. A stand-in for
llama-cpp-python records the parameters its constructor would load the model with (the real one is in the
slow tests)."""

from __future__ import annotations

import types

import pytest

from lorakit.formats import llamacpp


def fake_llama_cpp(with_field: bool = True):
    class Params:
        def __init__(self):
            self.n_gpu_layers = 0
            if with_field:
                self.use_extra_bufts = True

    low = types.SimpleNamespace(llama_model_default_params=Params)

    class Llama:  # as llama-cpp-python's: the model parameters come from the bindings' defaults
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            self.model_params = low.llama_model_default_params()

    return types.SimpleNamespace(Llama=Llama, llama_cpp=low), Params


@pytest.mark.parametrize("flags,env,off", [
    ({"avx512f", "amx_tile", "amx_bf16"}, None, True),
    ({"avx512f", "amx_tile"}, "1", False),     # the user keeps llama.cpp's AMX buffers
    ({"avx2", "fma"}, None, False),            # no AMX: nothing to turn off
    (None, None, False),                       # flags unknown (no /proc/cpuinfo)
])
def test_amx_buffers_are_off_only_where_the_cpu_reports_amx(monkeypatch, flags, env, off):
    monkeypatch.setattr("lorakit.training.hardware.cpu_flags", lambda: flags)
    if env is None:
        monkeypatch.delenv("LORAKIT_LLAMA_CPP_AMX", raising=False)
    else:
        monkeypatch.setenv("LORAKIT_LLAMA_CPP_AMX", env)
    module, defaults = fake_llama_cpp()
    assert llamacpp.amx_buffers_off() is off
    llm = llamacpp.open_model(module, model_path="m.gguf", n_ctx=64)
    assert llm.kwargs == {"model_path": "m.gguf", "n_ctx": 64}
    assert llm.model_params.use_extra_bufts is (not off) and llm.model_params.n_gpu_layers == 0
    assert module.llama_cpp.llama_model_default_params is defaults  # put back after the constructor
    assert module.llama_cpp.llama_model_default_params().use_extra_bufts is True


def test_defaults_are_put_back_when_the_constructor_fails(monkeypatch):
    monkeypatch.setattr("lorakit.training.hardware.cpu_flags", lambda: {"amx_tile"})
    monkeypatch.delenv("LORAKIT_LLAMA_CPP_AMX", raising=False)
    module, defaults = fake_llama_cpp()

    def broken(**kwargs):
        raise ValueError("Failed to load model from file: m.gguf")

    module.Llama = broken
    with pytest.raises(ValueError, match="m.gguf"):
        llamacpp.open_model(module, model_path="m.gguf")
    assert module.llama_cpp.llama_model_default_params is defaults


def test_a_llama_cpp_python_without_the_field_opens_as_it_is(monkeypatch):
    monkeypatch.setattr("lorakit.training.hardware.cpu_flags", lambda: {"amx_tile"})
    monkeypatch.delenv("LORAKIT_LLAMA_CPP_AMX", raising=False)
    module, defaults = fake_llama_cpp(with_field=False)
    llm = llamacpp.open_model(module, model_path="m.gguf")
    assert not hasattr(llm.model_params, "use_extra_bufts")
    assert module.llama_cpp.llama_model_default_params is defaults
