"""``llmos bench train``: our LoRA training step beside Hugging Face peft's, in one run.

Both sides train a rank-r LoRA on q, k, v, o, gate, up and down of the same GGUF (peft on
transformers' model of it), on the same padded batches of the shipped chat task, with
AdamW, in the same dtype; the sides alternate and the best run of each counts.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch

from llmos_kernel import store
from llmos_kernel.core.lora import LoraAdapter
from llmos_kernel.core.options import KernelOptions
from llmos_kernel.core.tokenizer import Tokenizer
from llmos_kernel.core.weights import load_model, parse_dtype, resolve_dtype
from llmos_kernel.train.data import IGNORE, load_examples
from llmos_kernel.train.facts import DATASETS
from llmos_kernel.train.forward import LoraModel
from llmos_kernel.train.trainer import batches

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(model: str = store.DEFAULT_MODEL, steps: int = 5, batch: int = 8, rank: int = 8,
        dtype: str = "auto", repeat: int = 2,
        progress: Callable[[str], None] = lambda m: None) -> dict:
    path = store.resolve_model(model)
    compute = parse_dtype(resolve_dtype(dtype))
    progress("loading our core and transformers' model of the same file")
    ours, gguf = load_model(path, options=KernelOptions(c_kernels=False, mkl_pack=False))
    tok = Tokenizer.from_gguf(gguf.metadata)
    examples = load_examples(DATASETS / "capitals_train.jsonl", tok)
    data = batches(examples, batch, random.Random(0))[:steps + 1]
    tokens = sum(t.numel() for t, _ in data[1:])

    lm = LoraModel(ours, LoraAdapter.init(ours.config, rank, 2 * rank), compute)
    our_opt = torch.optim.AdamW(lm.parameters(), lr=1e-3)

    def our_step(tokens: torch.Tensor, labels: torch.Tensor) -> None:
        loss, n = lm.loss(tokens, labels)
        (loss / n).backward()
        our_opt.step()
        our_opt.zero_grad(set_to_none=True)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=compute)
    hf = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                       target_modules=HF_TARGETS))
    hf.train()
    hf_opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-3)

    def hf_step(tokens: torch.Tensor, labels: torch.Tensor) -> None:
        mask = (labels != IGNORE) | (torch.arange(tokens.shape[1]) == 0)
        mask = torch.cumsum(mask.flip(1), 1).flip(1) > 0  # every position up to the last label
        hf(input_ids=tokens, attention_mask=mask.long(), labels=labels).loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    best = {"llmos": 0.0, "peft": 0.0}
    for r in range(repeat):
        for side, step in (("llmos", our_step), ("peft", hf_step)):
            step(*data[0])  # warm-up
            started = time.perf_counter()
            for tokens_, labels in data[1:]:
                step(tokens_, labels)
            rate = tokens / (time.perf_counter() - started)
            best[side] = max(best[side], rate)
            progress(f"run {r + 1}: {side} {rate:.0f} tok/s")
    return {"train_tok_s": best["llmos"], "ref_train_tok_s": best["peft"], "steps": steps,
            "batch": batch, "rank": rank, "dtype": str(compute).removeprefix("torch."),
            "tokens_per_run": tokens, "threads": torch.get_num_threads()}
