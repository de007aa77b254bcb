"""The layout of `lorakit ui`: a Gradio page whose buttons call `lorakit.ui.actions`.

One page, four numbered sections, top to bottom in the order of the work: (1) settings, with the
CLI's message under a bad field and the equivalent `lorakit train` command line; (2) the run: status
line (step, loss, tokens/s, ETA), loss curve and log, polled once a second from the run directory;
(3) chat with the base and the fine-tuned model side by side; (4) export, showing what `lorakit
export` printed. The callbacks here only translate between Gradio values and `actions`.

Local only: the server binds 127.0.0.1, with no share link, no analytics or version check
(GRADIO_ANALYTICS_ENABLED=False) and system fonts instead of the default theme's Google Fonts, so
the page makes no request beyond this machine.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from lorakit.ui import actions

# config key -> (label, help) of each setting, in the order of the form
SETTINGS = {
    "model.path": ("Base model", "empty: the embedded SmolLM2-135M-Instruct (Q4_1 GGUF); or a .gguf file, or a "
                                 "Hugging Face model directory"),
    "data.train": ("Training data", "empty: the embedded standard-library Q&A pairs; or a .jsonl / .csv / .parquet "
                                    "file of text, instruction or chat rows"),
    "method": ("Method", "qalora: 4-bit INT-N base, merges into it exactly · qlora: NF4 base · lora: dense base"),
    "train.steps": ("Steps", "optimizer steps"),
    "train.batch_size": ("Batch size", "examples per step"),
    "train.lr": ("Learning rate", "peak, after warmup"),
    "adapter.r": ("r", "adapter rank"),
    "adapter.alpha": ("alpha", "scaling = alpha / r"),
    "data.max_tokens": ("Max tokens", "per example; longer ones are cut"),
    "train.save_every": ("Checkpoint every", "steps; Stop loses at most this many"),
    "output_dir": ("Output directory", "the run directory that lorakit train, eval and export use"),
}
ROWS = (("model.path",), ("data.train",), ("method",), ("train.steps", "train.batch_size", "train.lr"),
        ("adapter.r", "adapter.alpha", "data.max_tokens"), ("train.save_every", "output_dir"))
DEFAULTS = {"method": "qalora", "train.steps": 40, "train.batch_size": 8, "train.lr": 1e-3, "adapter.r": 16,
            "adapter.alpha": 32, "data.max_tokens": 96, "train.save_every": 10}  # the demo's settings
CHAT_EXAMPLE = "What does `shlex.quote` do?"  # a validation module of the embedded data: never trained on
CSS = """
.field-error p { color: #b42318; font-size: 0.85em; margin: 2px 0 6px 0; }
.status p { font-size: 1.05em; }
.command textarea { font-family: ui-monospace, monospace; font-size: 0.9em; }
"""


def _import_gradio():
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no analytics, no version check: nothing leaves the machine
    try:
        import gradio as gr
    except ImportError:
        raise ImportError("lorakit ui needs Gradio: pip install 'lorakit[ui]' (or pip install gradio)") from None
    return gr


def new_output_dir() -> str:
    return time.strftime("runs/ui-%Y%m%d-%H%M%S")


def build_app():
    """The Gradio Blocks of the whole page (not launched)."""
    gr = _import_gradio()
    processes: dict[str, actions.TrainingProcess] = {}  # resolved run directory -> the child training it
    chat = actions.ChatModels()

    with gr.Blocks(title="lorakit", analytics_enabled=False) as app:
        gr.Markdown("# lorakit: fine-tune a model\nLoRA / QLoRA / QA-LoRA on this machine. Every run is an ordinary "
                    "`lorakit train` run directory: the command line below does the same.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=380):
                gr.Markdown("## 1. Settings")
                fields, errors = {}, {}
                for keys in ROWS:
                    with gr.Row():
                        for key in keys:
                            with gr.Column(min_width=110, scale=2 if key == "output_dir" else 1):
                                fields[key] = _input(gr, key, *SETTINGS[key])
                                errors[key] = gr.Markdown(visible=False, elem_classes="field-error")
                command = gr.Textbox(label="Equivalent command line", interactive=False, lines=2,
                                     elem_classes="command")
                with gr.Row():
                    start = gr.Button("Start", variant="primary")
                    stop = gr.Button("Stop", variant="stop")
                    resume = gr.Button("Resume")
            with gr.Column(scale=3, min_width=480):
                gr.Markdown("## 2. Run")
                run_dir = gr.Textbox(label="Run directory", info="the run shown here; type an earlier run's "
                                     "directory to watch, resume, chat with or export it")
                status = gr.Markdown("No run yet: choose the settings and press Start.", elem_classes="status")
                curve = gr.LinePlot(x="step", y="loss", color="curve", label="Loss",
                                    color_map={"train": "#9ecae1", "train (smoothed)": "#1f77b4",
                                               "validation": "#e66100"})
                with gr.Accordion("Log (RUN_DIR/train.log)", open=False):
                    log = gr.Textbox(show_label=False, lines=10, max_lines=10, interactive=False, autoscroll=True)
        gr.Markdown("## 3. Chat: base and fine-tuned, side by side\nEach message is answered on its own (greedy, "
                    "64 new tokens), once with the adapter off and once with it on.")
        with gr.Row():
            chats = [gr.Chatbot(label=label, height=300, feedback_options=None, buttons=["copy"])
                     for label in ("Base model (adapter off)", "Fine-tuned (adapter on)")]
            base_chat, tuned_chat = chats
        with gr.Row():
            question = gr.Textbox(show_label=False, placeholder=f"Ask both models, e.g. {CHAT_EXAMPLE}", scale=5,
                                  submit_btn=False)
            ask = gr.Button("Send", scale=1)
        gr.Markdown("## 4. Export")
        with gr.Row():
            fmt = gr.Radio(list(actions.EXPORT_FORMATS), value="gguf", label="Format",
                           info="gguf: merged model (llama.cpp) · gguf-adapter: llama.cpp --lora · peft · "
                                "hf: dense Hugging Face · ollama: GGUF + Modelfile", scale=3)
            out = gr.Textbox(label="Output path", placeholder="empty: RUN_DIR/export/model.gguf", scale=3)
            export = gr.Button("Export", variant="primary", scale=1)
        report = gr.Textbox(label="lorakit export", lines=6, interactive=False)

        inputs = [fields[key] for key in SETTINGS]
        checked = [*errors.values(), command, start]

        def on_settings(*values):
            problems = actions.check_settings(_settings(values))
            return (*[_error(gr, problems.get(key)) for key in errors],
                    actions.train_command(actions.overrides(_settings(values))), gr.update(interactive=not problems))

        def on_start(*values):
            try:
                process = actions.TrainingProcess.start(_settings(values))
            except ValueError:
                return (*on_settings(*values), gr.skip())
            processes[str(process.run_dir)] = process
            return (*on_settings(*values), str(process.run_dir))

        def on_stop(directory):
            process = processes.get(_resolved(directory))
            if process is None or not process.running:
                raise gr.Error("no run of this page is training in that directory")
            process.stop()

        def on_resume(directory):
            process = processes.get(_resolved(directory))
            if process is not None and process.running:
                raise gr.Error(f"{directory} is training already")
            try:
                process = actions.TrainingProcess.resume(directory)
            except ValueError as e:
                raise gr.Error(str(e)) from None
            processes[str(process.run_dir)] = process

        def on_tick(directory, seen):
            if not directory:
                return gr.skip(), gr.skip(), gr.skip(), seen
            process = processes.get(_resolved(directory))
            try:
                progress = actions.read_progress(directory)
            except ValueError as e:  # a metrics.jsonl edited by hand or damaged
                return f"**Cannot read the run**: {e}", gr.skip(), actions.log_tail(directory), seen
            state = (directory, len(progress.train), len(progress.valid))
            plot = _curve_frame(progress) if state != seen else gr.skip()
            return _status(directory, process, progress), plot, actions.log_tail(directory), state

        def on_ask(directory, text, base_history, tuned_history):
            try:
                base, tuned = chat.answers(directory, text)
            except (ValueError, FileNotFoundError) as e:
                raise gr.Error(str(e)) from None
            asked = {"role": "user", "content": text}
            return ("", [*base_history, asked, {"role": "assistant", "content": base}],
                    [*tuned_history, asked, {"role": "assistant", "content": tuned}])

        def on_export(directory, chosen, path):
            if not directory:
                raise gr.Error("no run directory: start a run, or type an earlier run's directory")
            line, printed, _ = actions.export(directory, chosen, path.strip() or None)
            return f"$ {line}\n{printed}"

        gr.on([f.blur if isinstance(f, gr.Textbox) else f.change for f in inputs], on_settings, inputs, checked)
        app.load(new_output_dir, None, fields["output_dir"]).then(on_settings, inputs, checked)  # a new run per visit
        start.click(on_start, inputs, [*checked, run_dir])
        stop.click(on_stop, run_dir)
        resume.click(on_resume, run_dir)
        seen = gr.State(None)
        gr.Timer(1.0).tick(on_tick, [run_dir, seen], [status, curve, log, seen], show_progress="hidden")
        gr.on([ask.click, question.submit], on_ask, [run_dir, question, base_chat, tuned_chat],
              [question, base_chat, tuned_chat])
        fmt.change(lambda chosen: gr.update(placeholder=f"empty: RUN_DIR/export/{actions.EXPORT_FORMATS[chosen]}"),
                   fmt, out)
        export.click(on_export, [run_dir, fmt, out], report)
    return app


def _input(gr, key: str, label: str, info: str):
    if key == "method":
        return gr.Radio(["qalora", "qlora", "lora", "qdora", "dora"], value=DEFAULTS[key], label=label, info=info)
    if key in ("model.path", "data.train"):
        return gr.Textbox(label=label, info=info, placeholder="embedded")
    if key == "output_dir":
        return gr.Textbox(label=label, info=info, value=new_output_dir())
    whole = key not in ("train.lr", "adapter.alpha")
    return gr.Number(value=DEFAULTS[key], label=label, info=info, precision=0 if whole else None,
                     step=1 if whole else 1e-4)


def _settings(values) -> dict:
    return dict(zip(SETTINGS, values))


def _error(gr, message: str | None):
    return gr.update(value=message or "", visible=bool(message))


def _resolved(directory: str) -> str:
    return str(Path(directory).expanduser().resolve()) if directory else ""


def _status(directory: str, process, progress: actions.Progress) -> str:
    """The status line: what the run is doing, and its numbers so far."""
    from lorakit.training.checkpoint import latest_checkpoint

    if not Path(directory).expanduser().is_dir():
        return f"**No run in `{directory}`** yet."
    numbers = progress.line()
    if process is not None and process.running:
        if not progress.train:
            return "**Starting**: loading the model and data; the first step follows"
        return f"**Training** · {progress.line(running=True)}"
    if progress.finished:
        return f"**Finished** · {numbers}"
    checkpoint = latest_checkpoint(directory)
    resumable = f"Resume continues from {checkpoint.name}" if checkpoint else "no checkpoint yet: Start again"
    if process is None:  # a run this page did not start: another `lorakit train` may be writing it
        return f"**Not finished** (not started from this page) · {numbers} · {resumable}"
    if not process.stopped and process.returncode:
        return f"**Failed** (exit status {process.returncode}): {actions.log_tail(directory, lines=1)} · {resumable}"
    return f"**Stopped** · {numbers} · {resumable}"


def _curve_frame(progress: actions.Progress):
    """The loss curve as the long table gr.LinePlot draws: one row per (step, loss, curve)."""
    import pandas as pd

    curves = {"train": progress.train, "train (smoothed)": actions.smoothed(progress.train),
              "validation": progress.valid}
    # Every curve has a row from the first frame on (a NaN loss, not drawn, until it has points): the plot fixes
    # its colours to the curves of the first frame it draws, and would draw a curve that appears later in none.
    rows = [(s, v, name) for name, points in curves.items() for s, v in points or [(0, math.nan)]]
    steps, losses, curves = zip(*rows)
    # typed: the plot takes its axes' kinds from the dtypes (an object column would be categorical)
    return pd.DataFrame({"step": pd.Series(steps, dtype="int64"), "loss": pd.Series(losses, dtype="float64"),
                         "curve": pd.Series(curves, dtype="string")})


def serve(port: int = 7860) -> None:
    """Serve the page on http://127.0.0.1:PORT until Ctrl-C (which, from a terminal, interrupts its training
    children too: they share its process group; Resume continues them from their last checkpoint)."""
    gr = _import_gradio()
    app = build_app()
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "SFMono-Regular", "monospace"])
    print(f"lorakit ui: http://127.0.0.1:{port} (local only; Ctrl-C to quit)", flush=True)
    app.launch(server_name="127.0.0.1", server_port=port, share=False, inbrowser=False, ssr_mode=False, pwa=False,
               mcp_server=False, enable_monitoring=False, footer_links=[], theme=theme, css=CSS, quiet=True)
