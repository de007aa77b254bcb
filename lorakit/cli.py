"""The `lorakit` command line. One subcommand per job; each is a thin call into the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lorakit.peft_format import CONFIG_FILE, LORAKIT_FILE, PREFIX, WEIGHTS_FILE, read_peft_config


def inspect_adapter(directory: Path) -> dict:
    """Summarise a PEFT adapter directory from its config and safetensors header (no tensor is loaded)."""
    from safetensors import safe_open

    config, raw = read_peft_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: {directory} is not a complete adapter directory")
    modules, params, dtypes, ranks = set(), 0, set(), set()
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            piece = f.get_slice(key)
            shape = piece.get_shape()
            n = 1
            for d in shape:
                n *= d
            params += n
            dtypes.add(str(piece.get_dtype()))
            for suffix in (".lora_A.weight", ".lora_embedding_A"):
                if key.endswith(suffix):
                    modules.add(key[len(PREFIX): -len(suffix)])
                    ranks.add(shape[0])
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    meta = json.loads((directory / LORAKIT_FILE).read_text()) if (directory / LORAKIT_FILE).is_file() else None
    return {
        "directory": str(directory),
        "peft_type": raw.get("peft_type", "LORA"),
        "r": sorted(ranks) if len(ranks) > 1 else config.r,
        "alpha": config.alpha,
        "scaling": config.scaling,
        "use_rslora": config.use_rslora,
        "dropout": config.dropout,
        "target_modules": config.target_modules,
        "modules_to_save": config.modules_to_save,
        "bias": config.bias,
        "adapted_layers": len(modules),
        "layer_names": sorted(modules),
        "parameters": params,
        "dtypes": sorted(dtypes),
        "size_bytes": sum(files.values()),
        "files": files,
        "lorakit": meta,
    }


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError


def _print_inspect(info: dict) -> None:
    print(f"adapter directory  {info['directory']}")
    print(f"type               {info['peft_type']} (Hugging Face PEFT format)")
    print(f"r                  {info['r']}")
    print(f"alpha              {info['alpha']:g}   scaling {info['scaling']:g}{'  (rsLoRA)' if info['use_rslora'] else ''}")
    print(f"dropout            {info['dropout']:g}")
    print(f"target_modules     {info['target_modules']}")
    if info["modules_to_save"]:
        print(f"modules_to_save    {info['modules_to_save']}")
    print(f"bias               {info['bias']}")
    names = info["layer_names"]
    shown = ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")
    print(f"adapted layers     {info['adapted_layers']}: {shown}")
    print(f"parameters         {info['parameters']:,} ({', '.join(info['dtypes'])})")
    print(f"size on disk       {_human(info['size_bytes'])}  " + "  ".join(f"{k} {_human(v)}" for k, v in info["files"].items()))
    meta = info["lorakit"]
    if meta and meta.get("base_weights"):
        print(f"base weights       {meta['base_weights']}")


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise SystemExit(f"lorakit inspect: {path} has no {CONFIG_FILE}; it is not an adapter directory")
        info = inspect_adapter(path)
    elif not path.exists():
        raise SystemExit(f"lorakit inspect: {path} does not exist")
    else:
        raise SystemExit(f"lorakit inspect: {path} is a file; give an adapter directory (containing {CONFIG_FILE})")
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_inspect(info)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA / QLoRA / QA-LoRA fine-tuning on the hardware you have")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print an adapter directory's config, rank, targets, parameters and size")
    p.add_argument("path", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
