"""The ``anemll-mlx`` command: parse flags, call the library, print.

Every command body runs under ``user_errors()``: a ``UserError`` from the library becomes one
``error: ...`` line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from . import interrupts
from .errors import BadArgumentError, UnsupportedError, UserError

# coremltools warns at import about its macOS-only bindings and prints a progress bar per pass
# pipeline; transformers (pulled in by coremltools' optional paths) announces torch is absent.
logging.getLogger("coremltools").setLevel(logging.ERROR)
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

app = typer.Typer(
    name="anemll-mlx",
    help="LLMs defined once on MLX, exported to chunked Core ML programs for the Apple Neural Engine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)
console = Console(stderr=True)
# Under mlx.launch / mpirun only rank 0 speaks: its lines, its progress, its one error line.
_quiet = False


@app.callback()
def _options(
    verbose: Annotated[bool, typer.Option("--verbose", help="Say which BLAS runs under MLX")] = False,
) -> None:
    """LLMs defined once on MLX, exported to chunked Core ML programs for the Apple Neural Engine."""
    from . import blas

    blas.limit_numpy_threads()
    if verbose:
        print(blas.status(), file=sys.stderr)


@contextmanager
def user_errors() -> Iterator[None]:
    """UserError -> one ``error:`` line, exit 2; SIGINT/SIGTERM -> one line, exit 130/143.

    Output is cleaned up by the writers themselves (``anemll_mlx.output``) before this sees it.
    """
    try:
        yield
    except UserError as e:
        if not _quiet:
            print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    except interrupts.Interrupted as e:
        interrupts.clear()
        if not _quiet:
            print(f"error: {e.message}; nothing was written", file=sys.stderr)
        raise typer.Exit(e.exit_code) from None


def _join(backend: str):
    """The world of this run (``distributed.connect``); a rank other than 0 goes quiet.  Before
    joining, rank 0 is the rank the launcher announced, so a backend that fails is said once."""
    global _quiet
    from .distributed import connect, launcher_rank

    _quiet = (launcher_rank() or 0) != 0
    world = connect(backend)
    _quiet = not world.main
    return world


ModelArg = Annotated[str, typer.Argument(help="Hugging Face folder, hub id org/name, or .gguf file")]
SpecArg = Annotated[
    str,
    typer.Argument(
        help="A driver spec (mlx:MODEL[@fp32|fp16|bf16], mil:DIR, coreml:DIR) or a bare path: an export "
        "folder runs on coreml on macOS and mil elsewhere, anything else is a model for mlx"
    ),
]

BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend",
        help="mx.distributed backend under mlx.launch or mpirun: any, ring, mpi, jaccl or nccl "
        "(any: what the launcher set up; a single process when nothing launched this)",
    ),
]

# sampling flags shared by generate and chat: None = the export's recommended_sampling, else the default
TempOpt = Annotated[float | None, typer.Option(help="Sampling temperature; 0 is greedy [default: the export's recommendation, else 0]")]
TopPOpt = Annotated[float | None, typer.Option(help="Nucleus sampling mass [default: recommended, else 1]")]
TopKOpt = Annotated[int | None, typer.Option(help="Sample from the K most likely tokens; 0: all [default: recommended, else 0]")]
PenaltyOpt = Annotated[float | None, typer.Option(help="Repetition penalty over the last 20 tokens; 1: none")]


def _open(spec_text: str, dtype: str | None = None, whole_context: bool = False):
    """A driver from a spec or a bare path, the spec checked before anything loads; a bare path
    that names an export says once which driver runs it.  The MLX reference gets the model's whole
    context with ``whole_context`` (``generate`` sizes its cache per call), else ``MLX_CONTEXT``
    positions (chat and serve keep one cache of that size)."""
    from .loading import parse_dtype
    from .runtime.drivers import MLX_DTYPES, MLXDriver, open_driver, parse_spec, resolve_spec

    spec, note = resolve_spec(spec_text)
    if dtype is not None:
        parse_dtype(dtype)
        if spec.kind != "mlx" or spec_text.startswith("mlx:"):
            raise BadArgumentError("--dtype applies to a bare model path; give the dtype in the spec (mlx:MODEL@fp16)")
        short = {v: k for k, v in MLX_DTYPES.items()}.get(dtype, dtype)
        spec = parse_spec(f"mlx:{spec_text}@{short}")
    if note:
        print(note, file=sys.stderr)
    driver = open_driver(spec)
    if isinstance(driver, MLXDriver) and whole_context:
        driver.context_length = driver.lm.model.args.max_position_embeddings
    return driver


def _sampling(driver, temp, top_p, top_k, repetition_penalty, seed):
    from .generate import Sampling, recommended_sampling

    sampling = Sampling.choose(
        recommended_sampling(driver), temp=temp, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, seed=seed
    )
    sampling.check()
    return sampling


def _check_sampling_flags(temp, top_p, top_k, repetition_penalty, max_tokens) -> None:
    """The sampling flags alone, before any model loads."""
    from .generate import Sampling

    Sampling(temp or 0.0, 1.0 if top_p is None else top_p, None, top_k or 0, 1.0 if repetition_penalty is None else repetition_penalty).check()
    if max_tokens < 1:
        raise BadArgumentError(f"--max-tokens must be >= 1, got {max_tokens}")


@app.command()
def generate(
    model: SpecArg,
    prompt: Annotated[str, typer.Option(help="Text to complete")] = "Hello",
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most (fewer where the context ends)")] = 256,
    temp: TempOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    repetition_penalty: PenaltyOpt = None,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Wrap the prompt in the chat template")] = True,
    dtype: Annotated[str | None, typer.Option(help="float32, float16 or bfloat16 for a bare model path [default: float32]")] = None,
    seed: Annotated[int, typer.Option(help="Random seed for sampling")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object last")] = False,
) -> None:
    """Stream a completion from any driver (the MLX reference or an export), then speed and memory figures."""
    from .generate import generate as run_generate

    with user_errors():
        if not prompt.strip():
            raise BadArgumentError("--prompt must not be empty")
        _check_sampling_flags(temp, top_p, top_k, repetition_penalty, max_tokens)
        driver = _open(model, dtype, whole_context=True)
        sampling = _sampling(driver, temp, top_p, top_k, repetition_penalty, seed)
        result = run_generate(driver, prompt, max_tokens, sampling, chat, on_text=lambda s: print(s, end="", flush=True))
    print()
    print("=" * 10)
    print(f"Prompt: {result.prompt_tokens} tokens, {result.prompt_tps:.1f} tokens/s")
    print(f"Generation: {len(result.tokens)} tokens, {result.generation_tps:.1f} tokens/s")
    print(f"Peak memory: {result.peak_memory_gb:.3f} GB")
    if result.context_full:
        print(f"(stopped at the context of {driver.context_length} tokens)", file=sys.stderr)
    if as_json:
        print(json.dumps(result.as_json()))


@app.command("chat")
def chat_command(
    model: SpecArg,
    system: Annotated[str | None, typer.Option(help="System prompt")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per answer at most")] = 512,
    temp: TempOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    repetition_penalty: PenaltyOpt = None,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling")] = None,
    trim: Annotated[bool, typer.Option("--trim", help="Drop the oldest turns when the conversation outgrows the context")] = False,
) -> None:
    """Talk to a model or an export: streaming answers, multi-turn history whose KV state is kept
    (only the new turn is prefilled), /reset, /system, /quit; Ctrl-C stops an answer."""
    from .chat import Chat, ChatOptions, repl

    with user_errors():
        _check_sampling_flags(temp, top_p, top_k, repetition_penalty, max_tokens)
        driver = _open(model)
        sampling = _sampling(driver, temp, top_p, top_k, repetition_penalty, seed)
        session = Chat(driver, ChatOptions(system, max_tokens, sampling, trim))

        def read_line() -> str | None:
            try:
                return input()
            except EOFError:
                return None

        def write(text: str) -> None:
            print(text, end="", flush=True)

        repl(session, read_line, write)


@app.command()
def serve(
    model: SpecArg,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default; 0.0.0.0 exposes it)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one, printed)")] = 8080,
    model_name: Annotated[str | None, typer.Option(help="The model id clients see [default: the folder or file name]")] = None,
) -> None:
    """An OpenAI-compatible HTTP API (/v1/models, /v1/chat/completions, /v1/completions) over one driver."""
    from pathlib import Path

    from . import serve as server

    with user_errors():
        if not 0 <= port <= 65535:
            raise BadArgumentError(f"--port must be in 0..65535, got {port}")
        sock = server.listen(host, port)  # before loading: a busy port is known at once
        try:
            engine = server.Engine(lambda: _open(model))  # opened on the thread that will run it
            driver = engine.driver
            name = model_name or Path(model.partition(":")[2] if ":" in model else model).name or model
            bound = sock.getsockname()[1]
            print(f"serving {name} ({driver.name}, context {driver.context_length}) at http://{host}:{bound}/v1", flush=True)
            try:
                server.run(engine, sock, name)
            except interrupts.Interrupted as e:  # uvicorn shut down gracefully, then re-raised the signal
                interrupts.clear()
                print(f"serve: {e.message}, stopped", file=sys.stderr)
                raise typer.Exit(e.exit_code) from None
        finally:
            sock.close()


@app.command()
def info(model: ModelArg) -> None:
    """Architecture and sizes of a model."""
    from .loading import load

    with user_errors():
        lm = load(model)
    a = lm.model.args
    rows = [
        ("source", lm.source),
        ("architecture", lm.architecture),
        ("parameters", f"{lm.num_parameters:,}"),
        ("layers", a.num_hidden_layers),
        ("hidden size", a.hidden_size),
        ("intermediate size", a.intermediate_size),
        ("attention heads", a.num_attention_heads),
        ("KV heads", a.num_key_value_heads),
        ("head dim", a.head_dim),
        ("vocab", a.vocab_size),
        ("context", a.max_position_embeddings),
        ("tied embeddings", a.tie_word_embeddings),
        ("dtype", str(lm.dtype).replace("mlx.core.", "")),
        ("bytes", f"{lm.nbytes:,}"),
    ]
    table = Table(show_header=False)
    for key, value in rows:
        table.add_row(key, str(value))
    Console().print(table)


def _lut(flag: str, text: str | None):
    from .quant.lut import parse_lut_spec

    if text is None:
        return None
    try:
        return parse_lut_spec(text)
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None


def _int_or_auto(flag: str, text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{flag} must be 'auto' or a whole number, not '{text}'") from None


MOE_MODE_HELP = (
    "Mixture-of-experts execution: dense (every expert pack called), routed (only the packs of the "
    "chosen experts), or auto (the faster estimate)"
)


def _print_plan(plan, max_chunk_mb: float, speed=None) -> None:
    """The plan's parts (MB each) and, per execution mode, the calls, weight bytes and estimated
    decode speed of one token."""
    from .export.plan import Speed

    speed = speed or Speed()
    table = Table(title=f"plan: {len(plan.chunks)} chunk(s), budget {max_chunk_mb:g} MB")
    for col in ("part", "layers", "MB"):
        table.add_column(col)
    for part, layers, mb in plan.rows():
        table.add_row(part, layers, f"{mb:.1f}")
    Console(width=200).print(table)
    kinds = {"embeddings": len(plan.embed_parts), "FFN chunks": len(plan.chunks), "lm_head": len(plan.head_parts)}
    sizes = plan.embed_bytes + plan.chunk_bytes + plan.head_bytes
    print(
        f"{sum(kinds.values())} programs ({', '.join(f'{n} {k}' for k, n in kinds.items())}), "
        f"largest {max(sizes) / 2**20:.1f} MB, {sum(sizes) / 2**30:.2f} GiB in all"
    )
    if plan.split_experts:
        packs = sum(1 for r in plan.roles if r.kind == "experts")
        layers = sum(1 for r in plan.roles if r.kind == "attention")
        print(f"expert packs: {packs} over {layers} layers ({plan.num_experts} experts, top {plan.top_k}); default mode {plan.moe_mode}")
    print("estimated per decoded token:")
    for mode in plan.modes():
        print("  " + plan.estimate(mode, speed).line())


@app.command("plan")
def plan_command(
    model: Annotated[str, typer.Argument(help="A config.json, a model folder or .gguf, or a hub id (fetches config.json only)")],
    chunk: Annotated[str, typer.Option(help="Number of FFN chunks, or auto (fewest under --max-chunk-mb)")] = "auto",
    max_chunk_mb: Annotated[float, typer.Option(help="Budget per program in MB (compiled bytes)")] = 250.0,
    lut: Annotated[str | None, typer.Option(help="LUT for the FFN chunks: BITS[,GROUP|0|t] or none")] = None,
    lut_lm_head: Annotated[str | None, typer.Option(help="LUT for the LM head")] = None,
    lut_embeddings: Annotated[str | None, typer.Option("--lut-embeddings", "--lut-embed", help="LUT for the embeddings")] = None,
    split_lm_head: Annotated[str, typer.Option(help="LM head pieces, or auto (<= 16384 rows each)")] = "auto",
    moe_mode: Annotated[str, typer.Option(help=MOE_MODE_HELP)] = "auto",
    bandwidth: Annotated[float, typer.Option(help="Weight bandwidth of the estimate, GB/s (120: the ANE of an M4 Max)")] = 120.0,
    call_ms: Annotated[float, typer.Option(help="Overhead of one Core ML call in the estimate, ms")] = 3.0,
) -> None:
    """The export plan (parts and MB each, calls and weight bytes per decoded token, estimated
    tokens/s per execution mode) from the config alone: no weights are read or downloaded."""
    from .export import ExportOptions
    from .export.plan import Speed
    from .loading import read_config
    from .models import build_model
    from .quant.lut import LUTConfig

    with user_errors():
        if not (bandwidth > 0 and call_ms >= 0):
            raise BadArgumentError(f"--bandwidth must be > 0 and --call-ms >= 0, got {bandwidth:g} and {call_ms:g}")
        options = ExportOptions(
            chunk=_int_or_auto("--chunk", chunk),
            max_chunk_mb=max_chunk_mb,
            lut=LUTConfig(
                ffn=_lut("--lut", lut),
                lm_head=_lut("--lut-lm-head", lut_lm_head),
                embeddings=_lut("--lut-embeddings", lut_embeddings),
            ),
            split_lm_head=_int_or_auto("--split-lm-head", split_lm_head),
            moe_mode=moe_mode,
        )
        options.check_flags()
        config, _ = read_config(model)
        plan = options.plan(build_model(config), Speed(bandwidth, call_ms))
        _print_plan(plan, max_chunk_mb, Speed(bandwidth, call_ms))


@app.command()
def export(
    model: ModelArg,
    out: Annotated[str, typer.Option("--out", help="Output folder (built beside it, renamed when complete)")],
    context: Annotated[int, typer.Option(help="Context length (KV cache positions)")] = 512,
    batch: Annotated[int, typer.Option(help="Tokens per prefill call")] = 64,
    chunk: Annotated[str, typer.Option(help="Number of FFN chunks, or auto (fewest under --max-chunk-mb)")] = "auto",
    max_chunk_mb: Annotated[float, typer.Option(help="Budget per program in MB (compiled bytes; above ~250 Core ML may leave the ANE)")] = 250.0,
    lut: Annotated[str | None, typer.Option(help="LUT for the FFN chunks: BITS[,GROUP|0|t] or none [default: none, or a LUT checkpoint's own]")] = None,
    lut_lm_head: Annotated[str | None, typer.Option(help="LUT for the LM head [default: none, or a LUT checkpoint's own]")] = None,
    lut_embeddings: Annotated[str | None, typer.Option("--lut-embeddings", "--lut-embed", help="LUT for the embeddings [default: none, or a LUT checkpoint's own]")] = None,
    fp16_scale: Annotated[str, typer.Option(help="auto (recipe or probe), none, or a number")] = "auto",
    prefix: Annotated[str | None, typer.Option(help="File name prefix (default: the architecture)")] = None,
    split_lm_head: Annotated[str, typer.Option(help="LM head pieces, or auto (<= 16384 rows each)")] = "auto",
    moe_mode: Annotated[str, typer.Option(help=MOE_MODE_HELP)] = "auto",
    attention_chunk: Annotated[int | None, typer.Option(help="Query rows per attention block in prefill (default batch/2)")] = None,
    argmax_in_model: Annotated[bool, typer.Option("--argmax-in-model", help="LM head outputs per-piece argmax")] = False,
    compile: Annotated[str, typer.Option(help="auto, yes or no: compile to .mlmodelc (macOS only)")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier export in --out")] = False,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Weight the LUT fits by calibration statistics (E[x^2] per input feature)")] = False,
    calibration_file: Annotated[list[str] | None, typer.Option("--calibration-file", help="Calibrate on this .txt or .jsonl (repeatable; implies --calibrate; default: the built-in calibration prompts)")] = None,
) -> None:
    """Write chunked, stateful (optionally LUT-palettized) Core ML programs in ANEMLL's layout."""
    from pathlib import Path

    from rich.progress import Progress, TaskID

    from .export import ExportOptions, can_compile, check_output, collect_moments, export_model
    from .loading import load, read_config
    from .loading.checkpoint import checkpoint_lut
    from .models import build_model
    from .probe.decision import decide_fp16_scale, parse_fp16_scale
    from .probe.recipes import find_recipe
    from .quant.lut import LUTConfig

    with user_errors():
        # everything that can be checked without the weights is checked first
        scale_setting = parse_fp16_scale(fp16_scale)
        options = ExportOptions(
            context=context,
            batch=batch,
            chunk=_int_or_auto("--chunk", chunk),
            max_chunk_mb=max_chunk_mb,
            lut=LUTConfig(
                ffn=_lut("--lut", lut),
                lm_head=_lut("--lut-lm-head", lut_lm_head),
                embeddings=_lut("--lut-embeddings", lut_embeddings),
            ),
            fp16_scale=scale_setting,
            prefix=prefix,
            split_lm_head=_int_or_auto("--split-lm-head", split_lm_head),
            moe_mode=moe_mode,
            attention_chunk=attention_chunk,
            argmax_in_model=argmax_in_model,
            compile=compile,
            force=force,
            calibrate=calibrate or bool(calibration_file),
            calibration_files=[Path(f) for f in calibration_file or []],
        )
        given = {"ffn": lut, "lm_head": lut_lm_head, "embeddings": lut_embeddings}
        explicit = {part for part, text in given.items() if text is not None}
        checkpoint = checkpoint_lut(model)  # a LUT checkpoint exports its own tables
        if checkpoint is not None:
            options.adopt_checkpoint(checkpoint, explicit)
        options.check_flags()
        config, source = read_config(model)
        if checkpoint is None and (checkpoint := checkpoint_lut(source)) is not None:  # a hub id's snapshot
            options.adopt_checkpoint(checkpoint, explicit)
            options.check_flags()
        target = check_output(out, force, source)
        skeleton = build_model(config)  # shapes only: no weights are read to plan
        options.check_model(skeleton)
        plan = options.plan(skeleton)
        options.check_plan(plan)
        _print_plan(plan, max_chunk_mb)

        lm = load(model, "float32", lazy=True)  # read part by part as the export goes
        if scale_setting == "auto":
            if find_recipe(lm) is None:
                print("--fp16-scale auto: no recipe matches this model, so the probe decides (pass a number or none to skip it)")
            with _stage_progress("probe") as progress:
                decision = decide_fp16_scale(lm, "auto", progress=progress)
            print(f"--fp16-scale auto: {decision}")
            options.fp16_scale = decision.value
            if decision.probed:  # the probe read the whole model: start the part-by-part reading afresh
                lm = load(model, "float32", lazy=True)
        moments = None
        if options.calibrate:
            with _stage_progress("calibration") as progress:
                moments = collect_moments(lm, options, progress)
            print(f"--calibrate: E[x^2] of every LUT input over {moments.tokens} tokens of {moments.source}")
            lm = load(model, "float32", lazy=True)  # the pass read the whole model: read it part by part again
        with Progress(*_bar_columns(), console=console) as bar:
            tasks: dict[str, TaskID] = {}

            def progress(part: str, done: int, total: int) -> None:
                if part not in tasks:
                    tasks[part] = bar.add_task(part, total=total)
                bar.update(tasks[part], completed=done)

            result = export_model(lm, target, options, progress, plan, moments)
    summary = Table(title=f"{result.out} ({result.seconds:.1f} s)")
    summary.add_column("package")
    summary.add_column("MB", justify="right")
    for name, size in result.files.items():
        summary.add_row(name, f"{size / 2**20:.1f}")
    Console().print(summary)
    if result.compiled:
        print("compiled every package to .mlmodelc")
    elif not can_compile():
        print("made .mlpackage only: compiling to .mlmodelc needs macOS with Xcode (xcrun coremlcompiler)")


def _bar_columns() -> tuple:
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

    return (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())


@contextmanager
def _stage_progress(name: str) -> Iterator:
    """A progress bar for work reported as ``progress(stage, done, total)``."""
    from rich.progress import Progress

    with Progress(*_bar_columns(), console=console, transient=True) as bar:
        task = bar.add_task(name, total=None)
        yield lambda stage, done, total: bar.update(task, description=stage, completed=done, total=total)


@app.command()
def inspect(
    folder: Annotated[str, typer.Argument(help="Export folder (with meta.yaml)")],
    max_chunk_mb: Annotated[float, typer.Option(help="Warn about programs larger than this (MB)")] = 250.0,
    bandwidth: Annotated[float, typer.Option(help="Weight bandwidth of the decode estimate, GB/s")] = 120.0,
    call_ms: Annotated[float, typer.Option(help="Overhead of one Core ML call in the estimate, ms")] = 3.0,
) -> None:
    """Check an export against ANEMLL's format, with its estimated decode speed per execution
    mode; exit 1 when something is off."""
    from .export.conformance import export_estimates, inspect_export
    from .export.plan import Speed

    with user_errors():
        if not max_chunk_mb > 0:
            raise BadArgumentError(f"--max-chunk-mb must be > 0, got {max_chunk_mb}")
        if not (bandwidth > 0 and call_ms >= 0):
            raise BadArgumentError(f"--bandwidth must be > 0 and --call-ms >= 0, got {bandwidth:g} and {call_ms:g}")
        parts, problems = inspect_export(folder, max_chunk_mb)
    table = Table(title=str(folder), box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1), collapse_padding=True)
    table.add_column("package", no_wrap=True)  # names are what a user greps for: never cut them
    for col in ("functions", "MB", "weights", "status"):
        table.add_column(col, justify="right" if col == "MB" else "left")
    for p in parts:
        table.add_row(p.name, ",".join(p.functions), f"{p.mb:.1f}", p.lut, "ok" if not p.problems else "; ".join(p.problems))
    Console().print(table)
    problems += [f"{p.name}: {q}" for p in parts for q in p.problems]
    for p in parts:
        for w in p.warnings:
            print(f"warning: {p.name}: {w}")
    for q in problems:
        print(f"problem: {q}")
    if parts and all(p.mb > 0 for p in parts):
        estimates = export_estimates(folder, parts, Speed(bandwidth, call_ms))
        if estimates:
            print("estimated per decoded token (program sizes on disk):")
        for e in estimates:
            print("  " + e.line())
    print("conforms to the ANEMLL layout" if not problems else f"{len(problems)} problem(s)")
    if problems:
        raise typer.Exit(1)


@app.command()
def compare(
    reference: Annotated[str | None, typer.Option(help="Reference driver: mlx:MODEL[@fp32|fp16|bf16][+scale=A][+lut=SPEC], mil:DIR or coreml:DIR")] = None,
    candidate: Annotated[str | None, typer.Option(help="Candidate driver spec")] = None,
    prompts: Annotated[str | None, typer.Option(help="Prompt file: JSONL with a 'prompt' key, or one per line")] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt (repeatable)")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Steps per prompt (fewer when the reference ends its turn) [default: 32]")] = None,
    free_run: Annotated[bool, typer.Option("--free-run", help="Let each generate on its own; report where they part")] = False,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Wrap prompts in the chat template")] = True,
    out: Annotated[str | None, typer.Option(help="Folder for results.jsonl and summary.json")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace earlier results in --out / an earlier --save-golden file")] = False,
    max_kl: Annotated[float | None, typer.Option(help="Exit 1 when the mean KL exceeds this")] = None,
    min_match: Annotated[float | None, typer.Option(help="Exit 1 when the match rate is below this (0-1)")] = None,
    save_golden: Annotated[str | None, typer.Option("--save-golden", help="Store the reference's prompt ids, logits and greedy tokens in this .npz")] = None,
    golden: Annotated[str | None, typer.Option("--golden", help="Check --candidate against a --save-golden file instead of a reference model")] = None,
    min_cosine: Annotated[float, typer.Option(help="With --golden: exit 1 when a position's logits cosine is below this")] = 0.97,
    max_token_mismatches: Annotated[int, typer.Option(help="With --golden: greedy tokens allowed to differ from the reference's")] = 0,
) -> None:
    """How far a candidate (an export) drifts from a reference, step by step; or, for models too big
    to hold twice, against a golden file the reference left (--save-golden, then --golden)."""
    from pathlib import Path

    from rich.progress import Progress

    from .eval import golden as goldens
    from .eval.compare import check_thresholds, gate, render_table, verdict, write_results
    from .eval.compare import compare as run_compare
    from .eval.prompts import load_prompts
    from .output import OutputFile, OutputFolder
    from .runtime.drivers import open_driver, parse_spec

    with user_errors():
        steps = 32 if max_tokens is None else max_tokens
        if steps < 1:
            raise BadArgumentError(f"--max-tokens must be >= 1, got {steps}")
        check_thresholds(max_kl, min_match)
        goldens.check_golden_thresholds(min_cosine, max_token_mismatches)
        if golden is not None:
            if reference is not None or save_golden is not None:
                raise BadArgumentError("--golden replaces --reference (and cannot be saved again): give --golden and --candidate")
            if candidate is None:
                raise BadArgumentError("--golden needs a --candidate to check")
            if prompts or prompt or max_tokens is not None or free_run:
                raise BadArgumentError("--golden brings its own prompts and steps (teacher-forced): drop --prompt(s), --max-tokens and --free-run")
        elif reference is None:
            raise BadArgumentError("give --reference (or --golden FILE)")
        elif candidate is None and save_golden is None:
            raise BadArgumentError("give --candidate, --save-golden FILE, or both")
        if save_golden is not None and free_run:
            raise BadArgumentError("--save-golden records teacher-forced steps: drop --free-run")
        specs = [parse_spec(s) for s in (reference, candidate) if s is not None]
        protect = [s.target for s in specs]
        target = OutputFolder.check(out, kind="compare", force=force, protect=protect) if out else None
        golden_file = OutputFile.check(save_golden, force=force, protect=protect, flag="--save-golden") if save_golden else None

        def bar_run(label: str, work):
            with Progress(console=console, transient=True) as bar:
                task = bar.add_task(label, total=None)
                return work(lambda done, total: bar.update(task, completed=done, total=total))

        if golden is not None:
            recorded = goldens.load(golden)
            cand = open_driver(parse_spec(candidate))  # type: ignore[arg-type]
            checked = bar_run("checking", lambda progress: goldens.check(recorded, cand, progress, cand.tokenizer.decode))
            result = checked.compared
            failures = gate(result.summary, max_kl, min_match) + goldens.golden_gate(checked, min_cosine, max_token_mismatches)
            if target is not None:
                with target.build() as folder:
                    write_results(result, folder)
            Console().print(render_table(result))
            print(verdict(result.summary))
            print(goldens.summary_line(checked))
            for failure in failures:
                print(f"gate: {failure}")
            if failures:
                raise typer.Exit(1)
            return

        texts = load_prompts(Path(prompts) if prompts else None, list(prompt or []))
        ref = open_driver(specs[0])
        tokenizer = ref.tokenizer
        ids = [tokenizer.encode_prompt(text, chat) for text in texts]
        if golden_file is not None:
            recorded = bar_run(
                "recording",
                lambda progress: goldens.record(ref, ids, steps, tokenizer.eos_token_ids, texts, progress),
            )
            with golden_file.build() as partial:
                goldens.save(recorded, partial)
            positions = sum(len(t) for t in recorded.tokens)
            print(f"saved {len(ids)} prompts, {positions} positions of {ref.name} to {golden_file.path}")
            if candidate is None:
                return
        cand = open_driver(specs[1])
        result = bar_run(
            "comparing",
            lambda progress: run_compare(
                ref, cand, ids, steps, free_run, progress=progress,
                texts=texts, detokenize=tokenizer.decode, stop_ids=tokenizer.eos_token_ids,
            ),
        )  # fmt: skip
        if target is not None:
            with target.build() as folder:
                write_results(result, folder)
        failures = gate(result.summary, max_kl, min_match)
    Console().print(render_table(result))
    print(verdict(result.summary))
    for failure in failures:
        print(f"gate: {failure}")
    if failures:
        raise typer.Exit(1)


@app.command()
def probe(
    model: ModelArg,
    prompts: Annotated[str | None, typer.Option(help="Prompt file: JSONL with a 'prompt' key, or one per line")] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt (repeatable); with --prompts, added after the file's")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens generated (float32, greedy) after each prompt")] = 8,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Wrap prompts in the chat template")] = True,
    out: Annotated[str | None, typer.Option("--out", help="Write the JSON report here")] = None,
    plot: Annotated[str | None, typer.Option("--plot", help="Write a PNG of per-layer peaks here")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing --out / --plot files")] = False,
) -> None:
    """Where activations pass fp16's 65504, and the --fp16-scale that keeps them inside it."""
    from pathlib import Path

    from .eval.prompts import load_prompts
    from .loading import load, read_config
    from .output import OutputFile
    from .probe.run import probe as run_probe

    with user_errors():
        if max_tokens < 0:
            raise BadArgumentError(f"--max-tokens must be >= 0, got {max_tokens}")
        texts = load_prompts(Path(prompts) if prompts else None, list(prompt or [])) if prompts or prompt else None
        _, source = read_config(model)
        targets = {
            flag: OutputFile.check(path, force=force, protect=[source], flag=flag)
            for flag, path in (("--out", out), ("--plot", plot))
            if path
        }
        if out and plot and targets["--out"].path == targets["--plot"].path:
            raise BadArgumentError("--out and --plot name the same file")
        lm = load(model, "float32")
        with _stage_progress("probe") as progress:
            report = run_probe(lm, texts, max_tokens, chat, progress=progress)
        if out:
            targets["--out"].write_text(json.dumps(report, indent=2) + "\n")
        if plot:
            from .probe.plot import plot_peaks

            with targets["--plot"].build() as partial:
                plot_peaks(report, partial)
    Console().print(_probe_table(report))
    for line in _probe_summary(report):
        print(line)
    print(report["verdict"])


@app.command("kd-cache")
def kd_cache(
    model: ModelArg,
    out: Annotated[str, typer.Option("--out", help="The cache folder (a rerun with the same settings resumes it)")],
    data: Annotated[list[str] | None, typer.Option("--data", help='Training text: .txt, or .jsonl with "text", "prompt" or "messages" per line (repeatable; default: the teacher samples its own from the built-in prompts)')] = None,
    samples: Annotated[int, typer.Option(help="Samples (sequences) to cache; fewer when the data is short")] = 1024,
    max_length: Annotated[int, typer.Option(help="Tokens per sample")] = 128,
    top_k: Annotated[int, typer.Option(help="Teacher logits kept per position")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the sampled text and of the choice of data pieces")] = 0,
    backend: BackendOpt = "any",
) -> None:
    """Cache the teacher's top-k logits over training text, for knowledge-distillation QAT.

    Under mlx.launch the ranks share the samples and rank 0 writes the one cache."""
    import time
    from pathlib import Path

    from rich.progress import Progress

    from .loading import load, read_config
    from .models import build_model
    from .probe.calibrate import read_samples
    from .qat.kd_cache import build_kd_cache, check_out, check_settings

    with user_errors():
        world = _join(backend)
        with world.together():
            files = [Path(f) for f in data or []]
            read_samples(files, noun="data file")  # missing, misnamed or malformed files fail here
            config, source = read_config(model)
            check_settings(build_model(config).args, samples, max_length, top_k)
            if world.main:
                check_out(Path(out), [source])
            lm = load(model, "float32")
        start = time.perf_counter()
        done = [0]

        def progress(made: int, total: int) -> None:
            done[0] = made
            bar.update(task, completed=made, total=total)

        try:
            with Progress(*_bar_columns(), console=console, transient=True, disable=_quiet) as bar:
                task = bar.add_task("kd-cache", total=None)
                cache = build_kd_cache(
                    lm, Path(out), files or None, samples, max_length, top_k, seed, progress, world
                )
        except interrupts.Interrupted as e:  # unlike other commands, the whole shards stay: say so
            interrupts.clear()
            if not _quiet:
                print(f"error: {e.message}; {done[0]} samples kept in {out}: rerun the same command to resume", file=sys.stderr)
            raise typer.Exit(e.exit_code) from None
        seconds = time.perf_counter() - start
    if not world.main:
        return
    tokens = cache.tokens
    ranks = f" on {world.size} ranks" if world.size > 1 else ""
    if cache.built == 0:
        print(f"{cache.path}: already complete, {cache.samples} samples of {tokens} tokens ({cache.nbytes / 2**20:.1f} MB)")
    else:
        print(
            f"{cache.path}: {cache.samples} samples, {tokens} tokens, top {cache.top_k} logits per position, "
            f"{cache.built} samples made in {seconds:.1f} s{ranks}, {cache.nbytes / 2**20:.1f} MB"
        )


@app.command()
def qat(
    model: ModelArg,
    out: Annotated[str, typer.Option("--out", help="The checkpoint folder (a model folder every command loads)")],
    lut: Annotated[str, typer.Option(help="LUT for the decoder layers: BITS[,GROUP|0|t] or none")] = "4,4",
    lut_lm_head: Annotated[str, typer.Option(help="LUT for the LM head (needs untied embeddings)")] = "none",
    lut_embeddings: Annotated[str, typer.Option("--lut-embed", "--lut-embeddings", help="LUT for the embeddings (needs untied embeddings)")] = "none",
    kd_cache_dir: Annotated[str | None, typer.Option("--kd-cache", help="A KD cache made by kd-cache [default: built with its defaults as OUT.kd-cache]")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps")] = 150,
    batch_size: Annotated[int, typer.Option(help="Sequences per step")] = 4,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the tables (latent weights: x --weights-lr)")] = 1e-4,
    weights_lr: Annotated[float, typer.Option(help="Latent weights' learning rate as a fraction of --lr")] = 0.1,
    schedule: Annotated[str, typer.Option(help="e2e (KL to the teacher's top-k, end to end), lbl (plus each layer's output against the teacher's), lbl+e2e (lbl for the first half of the steps)")] = "e2e",
    train: Annotated[str, typer.Option(help="What trains: tables, weights or tables,weights")] = "tables",
    temperature: Annotated[float, typer.Option(help="Distillation temperature")] = 2.0,
    hard_top1_weight: Annotated[float, typer.Option(help="Weight of the cross-entropy on the teacher's top-1")] = 0.1,
    hard_full_weight: Annotated[float, typer.Option(help="Weight of the full-vocabulary cross-entropy")] = 5e-4,
    precision: Annotated[str, typer.Option(help="fp32, or fp16 with dynamic loss scaling")] = "fp32",
    save_every: Annotated[int, typer.Option(help="Write the checkpoint (and the state --resume needs) every N steps")] = 100,
    init: Annotated[str | None, typer.Option(help="Start from this checkpoint's tables (refitted where its spec differs)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the training saved in --out")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the data order")] = 0,
    backend: BackendOpt = "any",
) -> None:
    """Train LUT weights against the float model (knowledge distillation) and write a checkpoint.

    Under mlx.launch every rank trains on its share of each batch (--batch-size is the global
    batch) and rank 0 writes the checkpoint; --resume works with any number of ranks."""
    from pathlib import Path

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .loading import read_config
    from .models import build_model
    from .qat.kd_cache import open_kd_cache
    from .qat.losses import LossWeights
    from .qat.run import check_resume, run_qat
    from .qat.train import QATSettings
    from .quant.lut import LUTConfig

    with user_errors():
        settings = QATSettings(
            lut=LUTConfig(
                ffn=_lut("--lut", lut), lm_head=_lut("--lut-lm-head", lut_lm_head), embeddings=_lut("--lut-embed", lut_embeddings)
            ),
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            weights_lr=weights_lr,
            train=tuple(t.strip() for t in train.split(",") if t.strip()),
            schedule=schedule,
            loss=LossWeights(temperature, hard_top1_weight, hard_full_weight),
            precision=precision,
            seed=seed,
            save_every=save_every,
        )
        settings.check()
        world = _join(backend)
        world.check_batch(batch_size)
        with world.together():
            config, source = read_config(model)
            skeleton = build_model(config)
            for target in skeleton.lut_targets():  # a group size the weights cannot take fails now
                spec = settings.lut[target.part]
                if spec is not None:
                    spec.num_groups(target.rows)
                    if target.holder.weight.ndim != 2:
                        raise UnsupportedError(f"qat of a mixture-of-experts model ({target.name}) is not supported yet")
            if world.main:
                check_resume(Path(out), resume, settings)
            if kd_cache_dir is not None:
                open_kd_cache(Path(kd_cache_dir))  # a missing or broken cache fails before loading
        ranks = f" on {world.size} ranks ({batch_size // world.size} each)" if world.size > 1 else ""
        if world.main:
            print(f"qat: {model} -> {out}, LUT {settings.lut}, {steps} steps of {batch_size}{ranks}, lr {lr:g}, {precision}")
        columns = (
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        )  # fmt: skip
        with Progress(*columns, console=console, disable=_quiet) as bar:
            kd_task = None
            train_task = None

            def kd_progress(done: int, total: int) -> None:
                nonlocal kd_task
                if kd_task is None:
                    kd_task = bar.add_task("kd-cache", total=total, info="teacher samples")
                bar.update(kd_task, completed=done)

            def on_step(step, result, rate) -> None:
                nonlocal train_task
                if train_task is None:
                    train_task = bar.add_task("qat", total=steps, completed=step - 1, info="")
                scale = "" if result.scale is None else f" scale {result.scale:g}"
                info = (
                    "overflow: step skipped" if result.skipped
                    else f"loss {result.loss:.4f} KL {result.kl:.4f} lr {result.lr:.2e} {rate:.0f} tok/s"
                )  # fmt: skip
                bar.update(train_task, completed=step, info=info + scale)

            try:
                report = run_qat(
                    model, Path(out), settings, Path(kd_cache_dir) if kd_cache_dir else None, init, resume,
                    stage=lambda line: bar.console.print(line), on_step=on_step, kd_progress=kd_progress,
                    world=world,
                )  # fmt: skip
            except interrupts.Interrupted as e:  # what was saved stays: say so, and how to go on
                saved = _saved_step(Path(out))
                if saved is None:
                    raise
                interrupts.clear()
                bar.stop()
                if not _quiet:
                    print(f"error: {e.message}; the checkpoint of step {saved} is kept in {out}: rerun with --resume to continue", file=sys.stderr)
                raise typer.Exit(e.exit_code) from None
    if not world.main:
        return
    table = Table(title=f"validation on held-out teacher samples ({report.steps} steps, {report.seconds / 60:.1f} min)")
    table.add_column("weights")
    table.add_column("KL", justify="right")
    table.add_column("match", justify="right")
    for name, row in report.validation.items():
        table.add_row(name, f"{row['kl']:.4f}", f"{100 * row['match']:.1f}%")
    Console().print(table)
    speed = report.throughput.summary()
    if world.size > 1:
        print(
            f"{world.size} ranks: {speed['tokens_per_second']:.0f} tok/s, {speed['comm_seconds_per_step'] * 1000:.1f} ms "
            f"of gradient reduction per step ({speed['reduced_bytes_per_step'] / 2**20:.2f} MB per rank)"
        )
    if report.overflow_rate is not None:
        print(f"fp16 overflow rate: {100 * report.overflow_rate:.2f}% of steps skipped")
    if report.got_worse:
        print("warning: validation KL ended worse than it started; try a lower --lr or fewer steps", file=sys.stderr)
    print(f"checkpoint: {report.checkpoint} (loss curves: {report.checkpoint}/qat-loss.png)")


def _saved_step(out) -> int | None:
    """The step of an unfinished QAT checkpoint in ``out``, None when there is none."""
    try:
        info = json.loads((out / "qat.json").read_text())
    except (OSError, ValueError):
        return None
    return None if info.get("complete") else info.get("step")


def _probe_table(report: dict) -> Table:
    """Per-layer peaks; rows past 0.75 x fp16 max in red."""
    sites = ("residual", "attn_out", "mlp_hidden", "mlp_out", "attn_scores")
    table = Table(title=f"{report['model']} ({report['architecture']}): peak |x| per layer, float32")
    table.add_column("layer", justify="right")
    for site in sites:
        table.add_column(site, justify="right")
    limit = 0.75 * report["fp16_max"]
    table.add_row("embed", f"{report['embedding']:,.1f}" if report["embedding"] is not None else "inf", *[""] * 4)
    for row in report["layers"]:
        cells = [f"{row[s]:,.1f}" if row[s] is not None else "inf" for s in sites]
        hot = any(row[s] is None or row[s] > limit for s in sites)
        table.add_row(str(row["index"]), *cells, style="bold red" if hot else None)
    return table


def _probe_summary(report: dict) -> list[str]:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    fp16, scaled = report["fp16"], report["scaled"]
    first = fp16["first_overflow"]
    peak = "inf" if report["peak"] is None else f"{report['peak']:,.1f}"
    ratio = "past float32" if report["ratio"] is None else f"{100 * report['ratio']:.3g}% of fp16 max"
    lines = [
        f"peak {peak} at layer {report['peak_layer']} ({report['peak_site']}), {ratio}",
        "float16: " + (f"inf/NaN first at layer {first['layer']} ({first['site']})" if first else "no overflow")
        + f", token match {pct(fp16['token_match'])}",
        f"bfloat16: token match {pct(report['bf16']['token_match'])}",
    ]
    if scaled["fp16_scale"] is not None:
        lines.append(
            f"float16 x {scaled['fp16_scale']}: {'inf/NaN' if scaled['overflow'] else 'no overflow'}, "
            f"token match {pct(scaled['token_match'])}"
        )
    sweep = ", ".join(f"{c['threshold']:g}: {pct(c['token_match'])}" for c in report["clamp_sweep"])
    lines.append(f"float16 with the residual clamped at {sweep}")
    lines.append(f"{report['tokens']} tokens from {report['prompts']} prompts in {report['seconds']:.1f} s")
    return lines


def main() -> None:
    """Console entry point: flag-parsing errors also get the one-line `error:` form, exit 2;
    Ctrl-C and SIGTERM stop any command with one line and exit 130 / 143."""
    interrupts.install()
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as e:  # click's usage errors (bad value, missing argument, ...)
        context = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and context is not None:
            print(context.get_help())
        else:
            print(f"error: {' '.join(e.format_message().split())}", file=sys.stderr)
        code = 2
    except (typer.Abort, interrupts.Interrupted) as e:  # a signal outside a command body
        signal = e if isinstance(e, interrupts.Interrupted) else e.__cause__
        code = signal.exit_code if isinstance(signal, interrupts.Interrupted) else 130
        print("error: interrupted", file=sys.stderr)
    code = code if isinstance(code, int) else 0
    if code in (130, 143):
        # A stopped run may leave MLX's per-thread stream workers (compare's reference thread)
        # joinable, and C++ static destructors at interpreter exit then abort the process
        # ("terminate called without an active exception", exit -6) after our one line.  The
        # command has already cleaned up what it wrote, so leave without those destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
