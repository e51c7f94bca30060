"""The ``anemll-mlx`` command: parse flags, call the library, print.

Every command body runs under ``user_errors()``: a ``UserError`` from the library becomes one
``error: ...`` line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import UserError

app = typer.Typer(
    name="anemll-mlx",
    help="LLMs defined once on MLX, exported to chunked Core ML programs for the Apple Neural Engine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)
console = Console(stderr=True)


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None


ModelArg = Annotated[str, typer.Argument(help="Hugging Face folder, hub id org/name, or .gguf file")]


@app.command()
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Option(help="Text to complete")] = "Hello",
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most")] = 256,
    temp: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass")] = 1.0,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Wrap the prompt in the chat template")] = True,
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16")] = "float32",
    seed: Annotated[int, typer.Option(help="Random seed for sampling")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object last")] = False,
) -> None:
    """Stream a completion from the MLX reference, then speed and memory figures."""
    import mlx.core as mx

    from .generate import check_sampling
    from .generate import generate as run_generate
    from .loading import load, parse_dtype

    with user_errors():
        parse_dtype(dtype)
        check_sampling(temp, top_p)
        if max_tokens < 1:
            raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
        lm = load(model, dtype)
        mx.random.seed(seed)
        result = run_generate(
            lm, prompt, max_tokens, temp, top_p, chat, on_text=lambda s: print(s, end="", flush=True)
        )
    print()
    print("=" * 10)
    print(f"Prompt: {result.prompt_tokens} tokens, {result.prompt_tps:.1f} tokens/s")
    print(f"Generation: {len(result.tokens)} tokens, {result.generation_tps:.1f} tokens/s")
    print(f"Peak memory: {result.peak_memory_gb:.3f} GB")
    if as_json:
        print(json.dumps(result.as_json()))


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


def main() -> None:
    app()
