"""``llmos bench core``: our Transformer core beside Hugging Face transformers, same GGUF.

Both run in this process on the same threads and the same token ids:
model load time, single-stream decode speed (time between the first and the
last new token, so prefill is excluded on both sides), and aggregate speed of
a batch of prompts of different lengths (wall time including prefill; the
reference pads the batch on the left, as its generate() requires).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from llmos_kernel import store
from llmos_kernel.bench.prompts import chat_prompts
from llmos_kernel.core.options import KernelOptions
from llmos_kernel.core.sampling import SamplingParams
from llmos_kernel.core.weights import parse_dtype, resolve_dtype
from llmos_kernel.engine.engine import Request
from llmos_kernel.engine.local import load_engine, set_threads
from llmos_kernel.errors import Unavailable


def load_reference(model_path, dtype: str = "fp32"):
    """transformers loading the same GGUF (the baseline), in its own ``dtype`` (fp32 or
    bf16: the whole model in that type); needs transformers + accelerate."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise Unavailable("the baseline needs transformers and accelerate: "
                          "pip install 'llmos[bench]'") from None
    model = AutoModelForCausalLM.from_pretrained(str(model_path.parent),
                                                 gguf_file=model_path.name,
                                                 dtype=parse_dtype(dtype))
    return model.eval()


class _Clock:
    """A transformers streamer that timestamps every new token."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def _ours_decode(engine, ids: list[int], n: int) -> float:
    engine.add_request(Request(f"decode-{time.monotonic_ns()}", ids,
                               SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)))
    times = []
    while engine.has_unfinished():
        if engine.step():
            times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


def _ref_decode(hf, ids: list[int], n: int) -> float:
    clock = _Clock()
    with torch.no_grad():
        hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock,
                    pad_token_id=0)
    return (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


def _ours_batch(engine, batch: list[list[int]], n: int, salt: str = "") -> float:
    """One batch run; a fresh ``salt`` keeps it from reusing an earlier run's prefix cache
    (prompts of one run still share theirs, as a user's would)."""
    started = time.perf_counter()
    for i, ids in enumerate(batch):
        engine.add_request(Request(f"batch-{i}-{time.monotonic_ns()}", ids,
                                   SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                                   cache_salt=salt))
    engine.run_until_done()
    return len(batch) * n / (time.perf_counter() - started)


def _ref_batch(hf, batch: list[list[int]], n: int, pad_id: int) -> float:
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
    started = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=pad_id)
    took = time.perf_counter() - started
    return (out.shape[1] - width) * len(batch) / took


def _context_restore(engine, n_tokens: int = 1000) -> tuple[float, float]:
    """Seconds to the first token after a kept 1,000-token context: restored from a host
    snapshot, and recomputed from scratch (prefix cache off)."""
    tok = engine.tokenizer
    text = " ".join(f"fact {i}: the {i}th lamp is {'on' if i % 2 else 'off'}." for i in range(400))
    ids = tok.encode(text)[:n_tokens]
    follow = tok.encode(" Which lamps are on?")
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    engine.add_request(Request("snapshot", ids, params, keep_context=True))
    engine.run_until_done()
    engine.suspend_context("snapshot")
    engine.run_until_done()  # the swap-out runs as a step of its own

    started = time.perf_counter()
    engine.add_request(Request("restore", follow, params, context="snapshot"))
    engine.run_until_done()
    restore = time.perf_counter() - started

    engine.blocks.prefix_caching = False
    try:
        started = time.perf_counter()
        engine.add_request(Request("recompute", ids + [0] + follow, params))
        engine.run_until_done()
        recompute = time.perf_counter() - started
    finally:
        engine.blocks.prefix_caching = True
    return restore, recompute


def run(model: str = store.DEFAULT_MODEL, *, new_tokens: int = 128, batch_size: int = 32,
        repeat: int = 2, dtype: str = "auto",
        progress: Callable[[str], None] = lambda _: None) -> dict:
    """``repeat``: how many times each side runs the batch; the best run of each counts
    (this machine is shared, so one slow run says more about the neighbours than the code).
    Both sides run in ``dtype`` (``auto`` resolved as the kernel resolves it).
    """
    set_threads()
    path = store.resolve_model(model)
    kernels = KernelOptions.from_env()
    dtype = resolve_dtype(dtype, options=kernels)
    progress(f"loading llmos core ({dtype})")
    started = time.perf_counter()
    engine = load_engine(str(path), dtype=dtype, kv_budget="1GiB", max_seqs=max(64, batch_size),
                         kernels=kernels)
    load_s = time.perf_counter() - started
    progress(f"loading the reference (transformers, {dtype})")
    started = time.perf_counter()
    hf = load_reference(path, dtype)
    ref_load_s = time.perf_counter() - started

    tok = engine.tokenizer
    batch = [tok.encode(tok.apply_chat_template(m), add_special_tokens=False)
             for m in chat_prompts(batch_size)]
    single = batch[0]
    progress("warming up")
    _ours_decode(engine, single, 4)
    _ref_decode(hf, single, 4)
    progress(f"single-stream decode, {new_tokens} tokens")
    decode, ref_decode = _ours_decode(engine, single, new_tokens), _ref_decode(hf, single, new_tokens)
    aggs, ref_aggs = [], []
    for i in range(max(1, repeat)):  # alternating, so a noisy spell hits both sides
        progress(f"batch of {batch_size} prompts x {new_tokens} tokens, run {i + 1} of {repeat}")
        aggs.append(_ours_batch(engine, batch, new_tokens, salt=f"bench-run-{i}"))
        ref_aggs.append(_ref_batch(hf, batch, new_tokens, tok.pad_token_id or 0))
    agg, ref_agg = max(aggs), max(ref_aggs)
    progress("a 1,000-token context: restore a snapshot vs recompute")
    restore, recompute = _context_restore(engine)
    return {
        "context_restore_s": restore, "context_recompute_s": recompute,
        "load_s": load_s, "ref_load_s": ref_load_s,
        "decode_tok_s": decode, "ref_decode_tok_s": ref_decode,
        f"batch{batch_size}_tok_s": agg, f"ref_batch{batch_size}_tok_s": ref_agg,
        f"batch{batch_size}_runs_tok_s": aggs, f"ref_batch{batch_size}_runs_tok_s": ref_aggs,
        "threads": torch.get_num_threads(), "dtype": dtype,
        "prompt_tokens": [len(ids) for ids in batch], "new_tokens": new_tokens,
    }
