"""``llmos generate``: one prompt through an in-process engine on the real model."""

from __future__ import annotations

import sys
import time

import click

from llmos_kernel import store


@click.command()
@click.argument("prompt")
@click.option("--model", default=store.DEFAULT_MODEL, show_default=True,
              help="Model name in the store, or a path to a .gguf file.")
@click.option("--raw", is_flag=True, help="Feed the prompt as is (no chat template).")
@click.option("--system", default=None, help="A system message (chat mode only).")
@click.option("--temperature", type=float, default=0.7, show_default=True,
              help="0 means greedy decoding.")
@click.option("--top-p", type=float, default=0.95, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 means off.")
@click.option("--min-p", type=float, default=0.0, show_default=True)
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Same seed, same output.")
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--num-beams", type=int, default=1, show_default=True)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              show_default=True, help="bf16: bf16 matrix products (AMX tiles or AVX512-BF16 "
              "where the CPU has them) and KV; auto: bf16 where that is the fast path, else "
              "fp32.")
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda when present.")
@click.option("-v", "--verbose", is_flag=True, help="Timings and token counts on stderr.")
def generate(prompt: str, model: str, raw: bool, system: str | None, temperature: float,
             top_p: float, top_k: int, min_p: float, repetition_penalty: float,
             seed: int | None, max_tokens: int, num_beams: int, stop: tuple[str, ...],
             stream: bool, dtype: str, device: str, verbose: bool) -> None:
    """Generate a continuation of PROMPT ('-' reads it from stdin).

    Prints only the generated text on stdout.
    """
    from llmos_kernel.core.sampling import SamplingParams
    from llmos_kernel.engine.engine import Request
    from llmos_kernel.engine.local import load_engine, set_threads

    if prompt == "-":
        prompt = sys.stdin.read()
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
                            seed=seed, stop=stop, num_beams=num_beams)
    params = params.validate()
    set_threads()
    engine = load_engine(model, dtype=dtype, device=device, kv_budget="auto")
    tok = engine.tokenizer
    if raw:
        ids = tok.encode(prompt)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    started = time.perf_counter()
    engine.add_request(Request("cli", ids, params))
    pieces: list[str] = []
    usage = None
    while engine.has_unfinished():
        for delta in engine.step():
            if stream:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
            else:
                pieces.append(delta.text)
            if delta.finished:
                usage = delta.usage
    sys.stdout.write("".join(pieces) + "\n")
    if verbose and usage is not None:
        took = time.perf_counter() - started
        click.echo(f"[load {engine.load_seconds:.1f}s, prompt {usage.prompt_tokens} tokens, "
                   f"generated {usage.completion_tokens} in {took:.2f}s, "
                   f"ttft {usage.ttft_s:.2f}s]", err=True)
