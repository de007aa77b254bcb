"""The `lorakit` command line. One subcommand per job; each is a thin call into the library."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from lorakit.io import check_safetensors, read_json
from lorakit.formats.peft import CONFIG_FILE, LORAKIT_FILE, PREFIX, WEIGHTS_FILE, read_peft_config


def inspect_adapter(directory: Path) -> dict:
    """Summarise a PEFT adapter directory from its config and safetensors header (no tensor is loaded)."""
    from safetensors import safe_open

    config, raw = read_peft_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: {directory} is not a complete adapter directory")
    check_safetensors(weights, "adapter weights")  # a damaged file is a clear error, not a SafetensorError
    modules, params, dtypes, ranks = set(), 0, set(), set()
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            piece = f.get_slice(key)
            shape = piece.get_shape()
            params += math.prod(shape)
            dtypes.add(str(piece.get_dtype()))
            for suffix in (".lora_A.weight", ".lora_embedding_A"):
                if key.endswith(suffix):
                    modules.add(key[len(PREFIX): -len(suffix)])
                    ranks.add(shape[0])
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    meta = read_json(directory / LORAKIT_FILE, "lorakit metadata") if (directory / LORAKIT_FILE).is_file() else None
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


def inspect_gguf(path: Path) -> dict:
    """A GGUF file's metadata (long arrays summarised), tensors with types and shapes, and type counts."""
    from lorakit.formats.gguf_load import read_gguf, tensor_shape

    reader = read_gguf(path)
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, list) and len(value) > 8:
            value = f"[{len(value)} items: {', '.join(map(repr, value[:3]))}, ...]"
        elif isinstance(value, str) and len(value) > 200:
            value = value[:200] + f"... ({len(value)} characters)"
        metadata[key] = value
    tensors = [{"name": t.name, "type": t.tensor_type.name, "shape": list(tensor_shape(t)), "bytes": int(t.n_bytes)}
               for t in reader.tensors]
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t["type"]] = counts.get(t["type"], 0) + 1
    return {"file": str(path), "size_bytes": path.stat().st_size, "metadata": metadata, "types": counts,
            "parameters": sum(math.prod(t["shape"]) for t in tensors), "tensors": tensors}


def _print_gguf(info: dict, all_tensors: bool) -> None:
    print(f"GGUF file          {info['file']}  ({_human(info['size_bytes'])})")
    print(f"parameters         {info['parameters']:,}")
    print(f"tensor types       {', '.join(f'{n} {t}' for t, n in sorted(info['types'].items()))}")
    print("metadata")
    for key, value in info["metadata"].items():
        print(f"  {key} = {value}")
    tensors = info["tensors"]
    shown = tensors if all_tensors else tensors[:12]
    print(f"tensors ({len(tensors)})")
    for t in shown:
        print(f"  {t['name']:40s} {t['type']:6s} {str(tuple(t['shape'])):16s} {_human(t['bytes'])}")
    if len(shown) < len(tensors):
        print(f"  ... {len(tensors) - len(shown)} more (--all lists every tensor)")


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise SystemExit(f"lorakit inspect: {path} has no {CONFIG_FILE}; it is not an adapter directory")
        info = inspect_adapter(path)
    elif not path.exists():
        raise SystemExit(f"lorakit inspect: {path} does not exist")
    elif path.suffix.lower() == ".gguf":
        info = inspect_gguf(path)
    else:
        raise SystemExit(f"lorakit inspect: {path} is neither a .gguf file nor an adapter directory "
                         f"(containing {CONFIG_FILE})")
    if args.json:
        print(json.dumps(info, indent=2))
    elif "tensors" in info:
        _print_gguf(info, args.all)
    else:
        _print_inspect(info)
    return 0


def load_base(base: str | None, *, quantized: bool = True, tokenizer: bool = True):
    """(model, tokenizer) for --base: a .gguf file (its own codes), a Hugging Face directory, or None (the
    embedded default model's GGUF)."""
    import lorakit
    from lorakit.models.default import default_gguf_path, load_causal_lm
    from lorakit.tasks.causal_lm import is_gguf

    if is_gguf(base):
        return lorakit.load_gguf(default_gguf_path() if base is None else base, quantized=quantized, tokenizer=tokenizer)
    return load_causal_lm(base)


def cmd_export(args: argparse.Namespace) -> int:
    import lorakit

    from lorakit.tasks.causal_lm import is_gguf

    image_run = bool(args.run) and _is_image_run(args.run)
    if image_run or args.format == "onnx":
        if not image_run or args.format not in (None, "onnx"):
            raise ValueError("--format onnx exports image-task runs (lorakit export RUN_DIR --format onnx); a language "
                             "model exports as gguf, gguf-adapter, hf, peft or ollama")
        from lorakit.tasks.edge import export_run_onnx

        print(export_run_onnx(args.run, args.out, int8=args.int8))
        return 0
    if args.int8:
        raise ValueError("--int8 applies to --format onnx (image-task runs); a GGUF export keeps the base's own types")
    args.format = args.format or "gguf"
    if args.run:  # a finished `lorakit train` run: its config.yaml names the base and method
        model, tokenizer, config = load_run(args.run)
        adapter = Path(args.run) / "adapter"
        qalora = config.method == "qalora"
        if args.template is None and is_gguf(config.model.path):
            from lorakit.models.default import default_gguf_path

            args.template = config.model.path or default_gguf_path()
    elif args.adapter:
        adapter = Path(args.adapter)
        meta = json.loads((adapter / LORAKIT_FILE).read_text()) if (adapter / LORAKIT_FILE).is_file() else {}
        qalora = bool((meta.get("config") or {}).get("group_size"))
        model, tokenizer = load_base(args.base, quantized=qalora, tokenizer=args.format == "hf")
        lorakit.load_adapter(model, adapter)
    else:
        raise ValueError("give a run directory (lorakit export RUN_DIR ...) or --adapter DIR [--base ...]")
    out = Path(args.out)
    if args.format == "peft":
        lorakit.save_adapter(model, out)
        print(f"wrote {out}: PEFT adapter directory")
        return 0
    if args.format == "gguf-adapter":
        lorakit.export_gguf_adapter(model, out, template=args.template)
        print(f"wrote {out} ({_human(out.stat().st_size)}): llama.cpp LoRA adapter for the base's tensors")
        return 0
    if args.format == "ollama":  # a directory: the GGUF that --format gguf writes, and a Modelfile beside it
        from lorakit.formats.ollama import GGUF_FILE

        if out.is_file():
            raise ValueError(f"--format ollama writes a directory ({GGUF_FILE} and a Modelfile), but {out} is a file: "
                             f"give a directory")
        out = out / GGUF_FILE
    if qalora:
        lorakit.merge_(model)  # exact: into the INT-N offsets
    else:
        lorakit.dequantize_and_merge_(model)
    if args.format == "hf":
        lorakit.export_hf(model, out, tokenizer, overwrite=args.force)
        print(f"wrote {out}: dense Hugging Face model")
        return 0
    report = lorakit.export_gguf(model, out, template=args.template, merged=str(adapter), overwrite=args.force)
    print(report)
    print(f"wrote {out} ({_human(out.stat().st_size)})")
    if args.format == "ollama":
        from lorakit.formats.ollama import write_modelfile

        try:
            modelfile = write_modelfile(out)
        except ValueError as e:
            raise ValueError(f"wrote {out} but no Modelfile: {e}") from None
        print(f"wrote {modelfile}: ollama create NAME -f {modelfile} && ollama run NAME")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from lorakit.training.run_config import load_config, read_run_config
    from lorakit.training.loop import TrainingStopped, train

    if args.resume:
        if args.config or args.overrides:
            given = " ".join(x for x in [args.config, *args.overrides] if x)
            raise ValueError(f"--resume continues a run with its own config.yaml; drop {given!r}")
        # the directory given is the run, wherever it was first written (a moved or copied run resumes in place)
        config = replace(read_run_config(args.resume), output_dir=str(Path(args.resume)))
    else:
        if args.config and "=" in args.config and not Path(args.config).exists():  # only overrides were given
            args.overrides, args.config = [args.config, *args.overrides], None
        config = load_config(args.config, args.overrides)
    try:
        result = train(config, resume=bool(args.resume), progress=not args.quiet)
    except TrainingStopped as e:
        print(f"lorakit train: stopped: {e}", file=sys.stderr)
        return 3
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 speaks
        print(f"run directory: {result.run_dir} (adapter/, metrics.jsonl, loss_curve.png, summary.json)")
    return 0


def load_run(run_dir: str, *, dtype=None):
    from lorakit.tasks.causal_lm import load_trained

    return load_trained(run_dir, dtype=dtype)


def _is_image_run(run_dir: str) -> bool:
    from lorakit.tasks.vision_runs import IMAGE_TASKS
    from lorakit.training.run_config import read_run_config

    return read_run_config(run_dir).task in IMAGE_TASKS


def cmd_predict(args: argparse.Namespace) -> int:
    from lorakit.tasks.vision_runs import predict_files
    from lorakit.training.run_config import read_run_config

    task = read_run_config(args.run).task
    if task == "causal-lm":
        raise ValueError(f"{args.run} is a language model run: use lorakit generate {args.run} --prompt TEXT")
    detection = task == "object-detection"
    given = {"--top": args.top, "--conf": args.conf, "--out": args.out}
    wrong = [flag for flag, value in given.items() if value is not None and (flag == "--top") == detection]
    if wrong:
        raise ValueError(f"{wrong[0]} does not apply to this task={task} run; "
                         + ("detection takes --conf and --out" if detection else "classification takes --top"))
    if args.top is not None and args.top < 1:
        raise ValueError(f"--top {args.top}: list at least 1 class")
    if args.conf is not None and not 0 <= args.conf <= 1:
        raise ValueError(f"--conf {args.conf}: a detection score threshold is in 0..1")
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:  # before the model loads
        more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{missing[0]}: no such image file{more}")
    options = {k: v for k, v in (("top", args.top), ("conf", args.conf)) if v is not None}
    results = predict_files(args.run, args.images, args.out, **options)
    for path, found in zip(args.images, results):
        print(path)
        for name, score, *box in found:
            where = "" if not box else "  [" + ", ".join(f"{v:.0f}" for v in box[0]) + "]"
            print(f"  {name:24s} {score:.3f}{where}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import math

    if _is_image_run(args.run):
        from lorakit.tasks.vision_runs import evaluate_run

        if args.data or args.prompt:
            raise ValueError("--data and --prompt apply to language model runs; an image run is evaluated on its "
                             "validation images (lorakit predict RUN IMAGE... for single images)")
        metrics = evaluate_run(args.run)
        print(", ".join(f"{k.removeprefix('valid_')} {v:.4f}" for k, v in metrics.items()))
        return 0
    from lorakit.data import records, render
    from lorakit.demo import answer
    from lorakit.tasks.causal_lm import evaluate, load_examples, pad_id_of

    model, tokenizer, config = load_run(args.run)
    if args.data:
        data = records.read_records(args.data, config.data.shape)
        examples = render.encode(tokenizer, data, config.data.max_tokens, config.data.train_on_prompt)
    else:
        _, examples, _ = load_examples(config, tokenizer)
    if not examples:
        raise ValueError("no evaluation data: the run has no validation split; pass --data FILE")
    loss = evaluate(model, examples, pad_id_of(tokenizer))
    print(f"{len(examples)} examples: loss {loss:.4f}, perplexity {math.exp(loss):.3f}")
    for prompt in args.prompt or []:
        print(f"Q: {prompt}\nA: {answer(model, tokenizer, prompt, args.max_new_tokens)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import contextlib

    import lorakit
    from lorakit.demo import answer

    gguf = _llama_cpp_file(args)
    if gguf is not None:
        from lorakit.demo import chat_ids
        from lorakit.formats.gguf_load import load_gguf_tokenizer
        from lorakit.formats.llamacpp import Generator

        tokenizer = load_gguf_tokenizer(gguf)
        generator = Generator(gguf)
        print(f"lorakit generate: llama.cpp on {gguf}", file=sys.stderr)

        def reply(prompt: str) -> str:
            ids = chat_ids(tokenizer, prompt)
            new = generator.generate_ids(ids, args.max_new_tokens, stop=_stop_ids(tokenizer))
            return tokenizer.decode(new, skip_special_tokens=True).strip()
    else:
        if args.run:
            model, tokenizer, _ = load_run(args.run)
        else:
            model, tokenizer = load_base(args.base)

        def reply(prompt: str) -> str:
            off = lorakit.disable_adapters(model) if args.no_adapter and args.run else contextlib.nullcontext()
            with off:
                return answer(model, tokenizer, prompt, args.max_new_tokens)

    for prompt in args.prompt or []:
        print(reply(prompt))
    if not args.prompt:  # chat from the terminal
        print("lorakit generate: type a message, empty line to quit", file=sys.stderr)
        while line := input("> ").strip():
            print(reply(line))
    return 0


def _llama_cpp_file(args: argparse.Namespace) -> Path | None:
    """The GGUF file llama.cpp answers with, or None for PyTorch. `--engine auto` takes llama.cpp when it is
    installed and the model is a GGUF file: the base (no run, or --no-adapter on a GGUF-based run) or a QA-LoRA
    run's lossless merge (`run_gguf`); `--engine llama.cpp` insists, and says why it cannot."""
    from lorakit.formats.llamacpp import available
    from lorakit.models.default import default_gguf_path
    from lorakit.tasks.causal_lm import is_gguf, run_gguf
    from lorakit.training.run_config import read_run_config

    if args.engine == "torch":
        return None
    wanted = args.engine == "llama.cpp"
    if not available():
        if wanted:
            raise ValueError("--engine llama.cpp needs llama-cpp-python: pip install llama-cpp-python (it compiles "
                             "llama.cpp, 3-10 minutes), or use --engine torch")
        return None
    if args.run:
        config = read_run_config(args.run)
        if args.no_adapter:  # the run's base, when it is a GGUF file
            gguf = None
            if is_gguf(config.model.path):
                gguf = Path(config.model.path).expanduser() if config.model.path else default_gguf_path()
        else:
            gguf = run_gguf(args.run, config)
        if gguf is None and wanted:
            raise ValueError(f"--engine llama.cpp runs GGUF files: {args.run} is a {config.method} run on "
                             f"{config.model.path or 'the embedded model'}, which has no lossless GGUF form (only "
                             f"QA-LoRA on a GGUF base merges into its own 4-bit codes); use --engine torch, or "
                             f"export it with lorakit export --format gguf (re-quantized) and run that file")
        return gguf
    if is_gguf(args.base):
        return default_gguf_path() if args.base is None else Path(args.base).expanduser()
    if wanted:
        raise ValueError(f"--engine llama.cpp runs GGUF files; --base {args.base} is not one: use --engine torch")
    return None


def _stop_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return [i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id]


def cmd_merge(args: argparse.Namespace) -> int:
    import lorakit

    model, tokenizer, config = load_run(args.run)
    out = Path(args.out or Path(args.run) / "merged")
    if config.base_method == "qlora":
        lorakit.dequantize_and_merge_(model)
    else:
        lorakit.merge_(model)
    lorakit.export_hf(model, out, tokenizer, overwrite=args.force)
    print(f"wrote {out}: the merged model as a dense Hugging Face directory"
          + ("" if config.method != "qalora" else " (use `lorakit export --format gguf` to keep it 4-bit)"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.vision:
        from lorakit.demo_vision import run_vision_demo

        run_vision_demo(args.out or "runs/demo-vision", steps=args.steps or 60, progress=not args.quiet)
        return 0
    from lorakit.demo import run_demo

    run_demo(args.out or "runs/demo", steps=args.steps or 40, progress=not args.quiet)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from lorakit.ui.app import serve

    serve(args.port)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lorakit.models.default import DEFAULT_MODEL
    from lorakit.serve.app import serve
    from lorakit.serve.engine import Engine

    adapters = {}
    for item in args.adapter or []:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--adapter {item!r}: write it as NAME=DIR, e.g. --adapter sql=runs/sql/adapter")
        if name in adapters:
            raise ValueError(f"--adapter {name}=... is given twice; each model name once")
        adapters[name] = directory
    model, tokenizer = load_base(args.base)
    base_name = args.name or (DEFAULT_MODEL if args.base is None else Path(args.base).expanduser().resolve().stem)
    engine = Engine(model, tokenizer, base_name, max_batch=args.max_batch)
    for name, directory in adapters.items():
        engine.load_adapter(name, directory).result()
    serve(engine, args.host, args.port, args.max_tokens)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from lorakit.report.plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out)}")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from lorakit.env_report import environment_report, format_report

    report = environment_report()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA / QLoRA / QA-LoRA fine-tuning on the hardware you have")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env", help="versions, device, compute dtype and why, threads: paste it into a problem report")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_env)
    p = sub.add_parser("inspect", help="print an adapter directory's or a GGUF file's contents")
    p.add_argument("path", help="adapter directory (adapter_config.json + adapter_model.safetensors) or FILE.gguf")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="list every tensor of a GGUF file")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("train", help="fine-tune: lorakit train CONFIG.yaml [key=value ...], or --resume RUN_DIR")
    p.add_argument("config", nargs="?", help="YAML config (omit for the defaults: QA-LoRA on the embedded model)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4 adapter.r=8")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint, exactly")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("plot", help="draw the loss and lr curves of one or more runs into one image, e.g. "
                                    "LoRA vs QLoRA vs QA-LoRA (needs matplotlib: pip install 'lorakit[plot]')")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (output_dir of lorakit train)")
    p.add_argument("--out", required=True, help="image file to write: .png (or .svg, .pdf)")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("eval", help="a run's validation metrics: perplexity (or on --data), accuracy, mAP")
    p.add_argument("run", help="run directory (output_dir of lorakit train)")
    p.add_argument("--data", help="a JSONL/CSV/Parquet file to evaluate instead")
    p.add_argument("--prompt", action="append", help="also answer this prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("predict", help="an image run's predictions for image files: top classes, or boxes "
                                       "(drawn into RUN_DIR/predictions/)")
    p.add_argument("run", help="run directory of an image-classification or object-detection run")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--top", type=int, help="classification: how many classes to list (default 5)")
    p.add_argument("--conf", type=float, help="detection: the lowest score kept (default 0.25)")
    p.add_argument("--out", help="detection: where to write the pictures (default RUN_DIR/predictions)")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("generate", help="answer prompts (or chat) with a run's model or a base model")
    p.add_argument("run", nargs="?", help="run directory (omit to use --base without an adapter)")
    p.add_argument("--base", help="FILE.gguf or Hugging Face directory when no run is given (default: embedded model)")
    p.add_argument("--prompt", action="append", help="prompt (repeatable); none: chat from the terminal")
    p.add_argument("--no-adapter", action="store_true", help="answer with the base model of the run")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--engine", choices=("auto", "torch", "llama.cpp"), default="auto",
                   help="auto (default): llama.cpp when llama-cpp-python is installed and the model is a GGUF file "
                        "(the base, or a QA-LoRA run merged losslessly into RUN_DIR/merged.gguf); else PyTorch")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("merge", help="merge a run's adapter into its base; write a dense Hugging Face model")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", help="output directory (default RUN_DIR/merged)")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not an earlier lorakit export")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("demo", help="the whole mission on the embedded model: QA-LoRA on its Q4_1 codes, "
                                    "lossless merge, GGUF export, report")
    p.add_argument("--vision", action="store_true", help="the vision story instead: YOLOv3-tiny and MobileNetV2 "
                                                          "fine-tuned with LoRA, adapters swapped, ONNX/INT8 export")
    p.add_argument("--out", help="output directory (default runs/demo, or runs/demo-vision with --vision)")
    p.add_argument("--steps", type=int, help="training steps per run (default 40, or 60 with --vision; a few "
                                             "minutes on 2 cores)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("export", help="merge an adapter into its base and write it (GGUF, Ollama, Hugging Face), "
                                      "or write the adapter alone (llama.cpp GGUF adapter, PEFT)")
    p.add_argument("run", nargs="?", help="run directory of lorakit train (or use --adapter and --base)")
    p.add_argument("--adapter", help="adapter directory written by lorakit (PEFT format)")
    p.add_argument("--base", help="the base it was trained on: FILE.gguf or a Hugging Face directory "
                                  "(default: the embedded SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--format", choices=["gguf", "gguf-adapter", "hf", "peft", "ollama", "onnx"], default=None,
                   help="default gguf; onnx for image-task runs (adapter merged, checked in onnxruntime)")
    p.add_argument("--int8", action="store_true", help="onnx: also write an INT8 model (static quantization, "
                                                        "calibrated on the run's training images) and score it")
    p.add_argument("--template", help="GGUF whose metadata and layout to write into (default: the base's own file)")
    p.add_argument("--out", required=True, help="output .gguf file (or directory for --format hf, ollama)")
    p.add_argument("--force", action="store_true", help="replace --out even if it is the base GGUF itself, or a "
                                                       "directory that is not an earlier lorakit export")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("ui", help="the whole workflow in a local web page (needs gradio: pip install 'lorakit[ui]')")
    p.add_argument("--port", type=int, default=7860, help="serve on http://127.0.0.1:PORT (default 7860; local only)")
    p.set_defaults(func=cmd_ui)
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over a base model and its adapters, each "
                                     "adapter a model name (needs fastapi and uvicorn: pip install 'lorakit[serve]')")
    p.add_argument("--base", help="FILE.gguf or Hugging Face directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR",
                   help="serve adapter directory DIR as model NAME (repeatable; more at run time: "
                        "POST /v1/load_lora_adapter)")
    p.add_argument("--name", help="the base's model name (default: the model's or file's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on, only this one (default 127.0.0.1: "
                                                       "this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="a chat request's max_tokens when it gives none (default 256)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lorakit.training.allocator import keep_freed_memory

    args = build_parser().parse_args(argv)
    keep_freed_memory()  # glibc: large freed buffers stay in the process (lorakit.training.allocator)
    try:
        return args.func(args)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, TypeError) as e:
        rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"lorakit {args.command}: error{rank}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
