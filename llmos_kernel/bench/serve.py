"""``llmos bench serve``: the kernel under a concurrent mixed workload, beside transformers.

Ours: ``concurrency`` requests in flight through a kernel (a running one, or
one started here), prompts of different lengths, each generating exactly
``max_tokens`` tokens; aggregate tokens/s, time to first token and
inter-token latency percentiles, prefix-cache hit rate. The baseline, in the
same run: transformers' padded batched ``generate`` on the same prompts, in
batches of ``concurrency``, in fp32 (``ref_*``) and, when the kernel runs
bf16, also in transformers' own bf16 (``ref_bf16_*``: its whole model in bf16,
faster and less exact than the kernel's bf16 products under fp32 activations);
with ``repeat``, the sides alternate and the best run of each is compared
(every run is reported; transformers' bf16 builds its oneDNN kernels for each
new shape during its first run, so its later runs are faster). Also this machine's fp32
GEMM peak, to state our throughput as a fraction of the compute bound
``peak / (2 * params)``: the best of torch's GEMM and llmos's own fp32 kernel on the
same shape (both reported), as MKL on AMD CPUs runs well below what the FMA units do.

``agg_tok_s`` counts generated tokens only. The compute bound is a rate of
tokens *processed* (every token, prompt or generated, costs about
``2 * params`` FLOPs), so ``processed_tok_s`` adds the prompt tokens the kernel
computed (prefix-cache hits not counted) and ``ref_processed_tok_s`` the prompt
tokens transformers was given (its padding not counted); processed over the
bound is the share of the machine's matrix peak doing the workload's work.

With ``--shards N`` (``compare_shards``) the same workload runs through a
single-shard kernel and an N-stage pipeline kernel (llmos_kernel.stages), one after
the other in the same run, and the ratio of their throughputs is reported beside the
size of one step plan (pickle, as Ray sends it, and msgpack) at 64 sequences with
1,000-token contexts, whole and as sent (only what changed): every stage reads it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llmos_kernel import store
from llmos_kernel.bench.core import load_reference
from llmos_kernel.bench.prompts import chat_prompts, shared_system_prompt
from llmos_kernel.bench.stats import percentile


def _best_rate(product, seconds: float, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP rate of ``product(x)`` (a 576 → 1536 projection of ``x`` in ``dtype``) at
    64, 128, 256 rows."""
    best = 0.0
    for rows in (64, 128, 256):
        x = torch.randn(rows, 576, dtype=dtype)
        for _ in range(3):
            product(x)
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 3:
            product(x)
            n += 1
        best = max(best, 2 * rows * 576 * 1536 * n / (time.perf_counter() - started))
    return best


def gemm_peak_flops(seconds: float = 1.0, dtype: torch.dtype = torch.float32) -> dict:
    """This machine's best GEMM rate in ``dtype`` over a shape the engine runs (576 → 1536,
    64..256 rows), by torch's kernels (MKL for fp32; oneDNN, on AMX tiles where the CPU has
    them, for bf16) and by llmos's own (fp32: the Q8_0 panels, dequantizing as they go;
    bf16: bf16_gemm), where it has them: ``{"torch": flops, "llmos": flops}``. The peak is
    the higher: on CPUs where MKL runs well below the FMA units' rate (AMD's), ours is."""
    from llmos_kernel.core import bf16_gemm, panel_gemm
    from llmos_kernel.core.options import KernelOptions
    from llmos_kernel.core.quant_matmul import QuantWeight

    kernels = KernelOptions.from_env()
    w = torch.randn(576, 1536)
    wt = w.to(dtype)
    rates = {"torch": _best_rate(lambda x: x @ wt, seconds, dtype)}  # torch in its own dtype
    if dtype == torch.float32 and kernels.c_kernels and panel_gemm.available():
        q = QuantWeight("Q8_0", torch.randint(-127, 128, (1536, 18, 32), dtype=torch.int8),
                        torch.rand(1536, 18) * 0.01, None)
        panels = panel_gemm.PanelWeight.from_quant(q)
        rates["llmos"] = _best_rate(lambda x: panel_gemm.matmul(x, panels), seconds)
    elif dtype == torch.bfloat16 and kernels.c_kernels and \
            bf16_gemm.available(kernels.bf16_kernel):
        tiles = bf16_gemm.TileWeight.from_weight(w)
        rates["llmos"] = _best_rate(
            lambda x: bf16_gemm.matmul(x, tiles, kernel=kernels.bf16_kernel), seconds)
    return rates


async def _drive(client, workloads: list[list[dict]], concurrency: int, max_tokens: int,
                 salt: str = "") -> dict:
    gate = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    itls: list[float] = []
    total = prompt_computed = 0

    async def one(messages: list[dict]) -> None:
        nonlocal total, prompt_computed
        async with gate:
            sent = time.perf_counter()
            request_id = await client.submit(messages=messages, max_tokens=max_tokens,
                                             temperature=0, ignore_eos=True, cache_salt=salt)
            last = None
            async for delta in client.stream(request_id):
                now = time.perf_counter()
                if delta.token_ids:
                    if last is None:
                        ttfts.append(now - sent)
                    else:
                        itls.append((now - last) / len(delta.token_ids))
                    last = now
                    total += len(delta.token_ids)
                usage = delta.usage
                if usage:  # prompt tokens this kernel computed (prefix-cache hits excluded)
                    prompt_computed += usage.prompt_tokens - usage.cached_tokens

    started = time.perf_counter()
    await asyncio.gather(*(one(m) for m in workloads))
    wall = time.perf_counter() - started
    return {"agg_tok_s": total / wall, "processed_tok_s": (total + prompt_computed) / wall,
            "ttft_p50_s": percentile(ttfts, 0.5),
            "ttft_p99_s": percentile(ttfts, 0.99), "itl_p50_s": percentile(itls, 0.5),
            "itl_p99_s": percentile(itls, 0.99), "wall_s": wall, "tokens": total}


async def _ttft(client, messages: list[dict]) -> dict:
    """Time to first token of one high-priority request, with the kernel's account of its
    wait: ``queue_s`` (until its first step began: the rest of the step in flight when it
    arrived) and ``steps_waited`` (steps that began after it arrived and before its first;
    0 means it ran in the very next step)."""
    sent = time.perf_counter()
    request_id = await client.submit(messages=messages, max_tokens=1, temperature=0,
                                     priority=10)
    ttft, usage = None, None
    async for delta in client.stream(request_id):
        if delta.token_ids and ttft is None:
            ttft = time.perf_counter() - sent
        usage = delta.usage or usage
    return {"ttft_s": float("nan") if ttft is None else ttft,
            "queue_s": usage.queue_s if usage else float("nan"),
            "steps_waited": usage.steps_waited if usage else -1}


def _reference(hf, tokenizer, workloads, concurrency: int,
               max_tokens: int) -> tuple[float, float]:
    """transformers' generated tokens/s, and its prompt plus generated tokens/s (padding
    not counted: only the tokens the workload asked for)."""
    pad = tokenizer.pad_token_id or 0
    batches = [workloads[i:i + concurrency] for i in range(0, len(workloads), concurrency)]
    total, prompts, started = 0, 0, time.perf_counter()
    for batch in batches:
        ids = [tokenizer.encode(tokenizer.apply_chat_template(m), add_special_tokens=False)
               for m in batch]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            out = hf.generate(input_ids, attention_mask=mask, max_new_tokens=max_tokens,
                              min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
        total += (out.shape[1] - width) * len(batch)
        prompts += sum(map(len, ids))
    wall = time.perf_counter() - started
    return total / wall, (total + prompts) / wall


def _http_server(kernel_name: str, state_dir: str | None, repeat: int, concurrency: int):
    """``llmos serve`` in a process of its own, as a user runs it, on a loopback port; one
    API key (so one kernel process, with its own prefix-cache tenant, as the in-cluster
    runs each have their own salt) per run."""
    from llmos_kernel.bench.http import ServeProcess

    keys = {f"bench-http-{rep}-key": {"name": f"bench-http-{rep}", "max_streams": concurrency}
            for rep in range(repeat)}
    return ServeProcess.start(kernel_name, state_dir, keys)


def run(*, kernel_name: str = "kernel", address: str | None = None, concurrency: int = 64,
        requests: int = 128, repeat: int = 1,
        max_tokens: int = 64, shared_prefix: int = 0, max_words: int = 200,
        baseline: bool = True, dtype: str = "auto",
        model: str = store.DEFAULT_MODEL, kv_budget: str = "auto", http: bool = False,
        shards: int = 1, progress: Callable[[str], None] = lambda _: None) -> dict:
    """``http``: also drive the same workload through ``llmos serve``'s OpenAI API (a
    server started here, on the loopback), alternating with the in-cluster client."""
    import ray

    from llmos_kernel.client import KernelClient, unwrap
    from llmos_kernel.launcher import find_kernel

    started_here, state_dir = None, None
    if not ray.is_initialized():
        if address:
            from llmos_kernel.launcher import connect_ray

            connect_ray(address)
        else:  # a private local Ray instance: nothing else running here can disturb it
            ray.init(namespace="llmos", logging_level="ERROR", log_to_driver=False,
                     include_dashboard=False)
    if find_kernel(kernel_name) is None:
        import tempfile

        from llmos_kernel.core.options import KernelOptions
        from llmos_kernel.engine.assembly import LLMConfig
        from llmos_kernel.kernel import KernelConfig
        from llmos_kernel.launcher import start_kernel

        progress(f"starting a kernel ({model})")
        state = state_dir = tempfile.mkdtemp(prefix="llmos-bench-")
        started_here = start_kernel(KernelConfig(
            state_dir=state, name=kernel_name,
            llm=LLMConfig.of(model=model, dtype=dtype, kv_budget=kv_budget,
                             max_seqs=max(64, concurrency), kernels=KernelOptions.from_env(),
                             shards=shards)),
            detached=False)
        client = KernelClient(started_here, (Path(state) / "root.token").read_text())
    else:
        client = KernelClient.connect(kernel_name)

    async def status() -> dict:
        return await client.status()

    loop = asyncio.new_event_loop()
    st = loop.run_until_complete(status())
    model_path = st["model"]["path"]
    from llmos_kernel.core.gguf_file import GGUFFile
    from llmos_kernel.core.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(GGUFFile.open(model_path).metadata)
    system = shared_system_prompt(shared_prefix, tokenizer) if shared_prefix else None
    workloads = chat_prompts(requests, system=system, max_words=max_words)

    progress("warming up")
    loop.run_until_complete(_drive(client, workloads[:2], 2, 4, salt="warm-up"))
    probe = [{"role": "user", "content": "Say yes."}]
    ttft_idle = loop.run_until_complete(_ttft(client, probe))
    dtype = st["model"]["dtype"]  # the kernel's, resolved
    # The reference in fp32 (as the issue and DESIGN.md measure it) and, beside a bf16
    # kernel, in transformers' own bf16 too (its fastest here, and less exact than ours).
    ref_dtypes = (["fp32"] + (["bf16"] if dtype == "bf16" else [])) if baseline else []
    hfs = {d: load_reference(store.resolve_model(model_path), d) for d in ref_dtypes}
    runs: list[dict] = []
    refs: dict[str, list[tuple[float, float]]] = {d: [] for d in ref_dtypes}
    server = _http_server(kernel_name, state_dir, repeat, concurrency) if http else None
    for rep in range(repeat):
        # Each run under its own cache salt: none reuses the prefix cache of another.
        salt = f"bench-serve-{rep}-{time.time_ns()}"
        progress(f"llmos: {requests} requests, {concurrency} at a time, {max_tokens} tokens "
                 f"each (run {rep + 1} of {repeat})")
        before = loop.run_until_complete(status())["prefix_cache"]

        async def loaded(salt: str = salt) -> tuple[dict, dict, float]:
            run = asyncio.ensure_future(_drive(client, workloads, concurrency, max_tokens,
                                               salt=salt))
            await asyncio.sleep(2.0)  # let the low-priority work saturate the engine
            ttft = await _ttft(client, probe)
            step = (await client.status())["step_p50_s"]
            return await run, ttft, step

        ours, busy, step_s = loop.run_until_complete(loaded())
        after = loop.run_until_complete(status())["prefix_cache"]
        queried = after["query_tokens"] - before["query_tokens"]
        runs.append({**ours, "prefix_hit_rate": (after["hit_tokens"] - before["hit_tokens"])
                     / queried if queried else 0.0,
                     "ttft_high_priority_busy_s": busy["ttft_s"],
                     "high_priority_queue_s": busy["queue_s"],
                     "high_priority_steps_waited": busy["steps_waited"], "step_p50_s": step_s})
        progress(f"llmos run {rep + 1}: {ours['agg_tok_s']:.1f} tok/s")
        if server is not None:
            from llmos_kernel.bench import http as http_bench

            progress(f"llmos through HTTP: the same requests (run {rep + 1} of {repeat})")
            over_http = loop.run_until_complete(http_bench.drive(
                server.url, f"bench-http-{rep}-key", server.model_id, workloads,
                concurrency, max_tokens))
            runs[-1].update({f"http_{k}": v for k, v in over_http.items()})
            progress(f"llmos through HTTP run {rep + 1}: {over_http['agg_tok_s']:.1f} tok/s")
        for ref_dtype, hf in hfs.items():  # alternating with ours: a noisy spell hits all
            progress(f"baseline: transformers {ref_dtype}, padded batches of the same prompts "
                     f"(run {rep + 1} of {repeat})")
            refs[ref_dtype].append(_reference(hf, tokenizer, workloads, concurrency,
                                              max_tokens))
            progress(f"baseline {ref_dtype} run {rep + 1}: {refs[ref_dtype][-1][0]:.1f} tok/s")
    best = max(runs, key=lambda r: r["agg_tok_s"])
    result = {**best, "concurrency": concurrency, "requests": requests, "repeat": repeat,
              "max_words": max_words,
              "max_tokens": max_tokens, "shared_prefix": shared_prefix,
              "ttft_high_priority_idle_s": ttft_idle["ttft_s"],
              "runs_agg_tok_s": [r["agg_tok_s"] for r in runs]}
    if shared_prefix:
        progress("the same workload with prefix caching off")
        unwrap(loop.run_until_complete(client.handle.configure.remote(
            client.token, {"prefix_caching": False})))
        try:
            nocache = loop.run_until_complete(_drive(client, workloads, concurrency, max_tokens))
        finally:
            unwrap(loop.run_until_complete(client.handle.configure.remote(
                client.token, {"prefix_caching": True})))
        result["ttft_p50_nocache_s"] = nocache["ttft_p50_s"]
        result["agg_tok_s_nocache"] = nocache["agg_tok_s"]
    result["dtype"] = dtype
    result["bf16_kernel"] = st["shard"].get("bf16_kernel")
    params = st["model"]["params"]
    # The bound of bf16 products too, beside the fp32 one.
    for key, peak_dtype in [("", torch.float32)] + ([("_bf16", torch.bfloat16)]
                                                    if dtype == "bf16" else []):
        progress(f"measuring this machine's {'bf16' if key else 'fp32'} GEMM peak")
        rates = gemm_peak_flops(dtype=peak_dtype)
        peak = max(rates.values())
        result[f"gemm_peak{key}_gflops"] = peak / 1e9
        result[f"compute_bound{key}_tok_s"] = peak / (2 * params)
        for who, rate in rates.items():
            result[f"gemm_peak{key}_{who}_gflops"] = rate / 1e9
    for ref_dtype, got in refs.items():  # ref_*: fp32; ref_bf16_*: transformers' bf16
        key = "ref" if ref_dtype == "fp32" else f"ref_{ref_dtype}"
        result[f"{key}_agg_tok_s"], result[f"{key}_processed_tok_s"] = max(got)
        result[f"runs_{key}_agg_tok_s"] = [r[0] for r in got]
    if server is not None:
        result["runs_http_agg_tok_s"] = [r["http_agg_tok_s"] for r in runs]
        server.stop()
    result["shards"] = len(st.get("stages") or [None])
    result["steps_in_flight"] = loop.run_until_complete(status())["steps_in_flight"]
    loop.run_until_complete(client.close())
    if started_here is not None:  # its shards and placement group first, then the kernel
        ray.get(started_here.shutdown.remote(client.token), timeout=60)
        ray.kill(started_here)
    return result


def step_plan_bytes(seqs: int = 64, context: int = 1000, outputs: int = 500,
                    block_size: int = 16) -> dict:
    """The size of one decode step's plan for ``seqs`` sequences of ``context`` tokens
    (``outputs`` of them generated, which the sampler reads), as Ray pickles it and as
    msgpack: whole (every list sent each step, as plans were before plan_state) and as
    the engine sends it in a steady decode step (only what changed since the last)."""
    import dataclasses
    import pickle

    import msgpack

    from llmos_kernel.core.sampling import SamplingParams
    from llmos_kernel.engine.plan_state import PlanSender
    from llmos_kernel.engine.runner import SeqStep, StepPlan

    blocks = -(-context // block_size)
    outs = {i: list(range(1000, 1000 + outputs)) for i in range(seqs)}
    params = {i: SamplingParams() for i in range(seqs)}  # a request's, kept step to step

    def plan() -> StepPlan:
        return StepPlan([SeqStep(i, [17], context - 1, list(range(i * blocks, (i + 1) * blocks)),
                                 sample=True, params=params[i], output_ids=outs[i])
                         for i in range(seqs)])

    whole, sender = plan(), PlanSender()
    for step in plan().seqs:  # the step before: the runner holds everything up to it
        sender.encode(step)
    for out in outs.values():
        out.append(17)
    steady = plan()
    for step in steady.seqs:
        sender.encode(step)
    return {"plan_pickle_bytes": len(pickle.dumps(steady, protocol=5)),
            "plan_msgpack_bytes": len(msgpack.packb(dataclasses.asdict(steady))),
            "plan_whole_pickle_bytes": len(pickle.dumps(whole, protocol=5)),
            "plan_whole_msgpack_bytes": len(msgpack.packb(dataclasses.asdict(whole))),
            "plan_seqs": seqs, "plan_context": context}


def compare_shards(shards: int, progress: Callable[[str], None] = lambda _: None,
                   **options) -> dict:
    """The same workload through a single-shard kernel, then an ``shards``-stage one, in
    this run (``options`` as ``run`` takes them, less the baseline): both results, the
    ratio of their aggregate throughputs and the step plan's size."""
    options.pop("kernel_name", None)
    single = run(kernel_name="bench-shards-1", shards=1, baseline=False, progress=progress,
                 **options)
    progress(f"the same workload through {shards} pipeline stages")
    split = run(kernel_name=f"bench-shards-{shards}", shards=shards, baseline=False,
                progress=progress, **options)
    return {"single": single, "split": split, "shards": shards,
            "ratio": split["agg_tok_s"] / single["agg_tok_s"], **step_plan_bytes()}
