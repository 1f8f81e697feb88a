"""A differentiable forward of the core for training: plain torch ops over the model's
dequantized, frozen weights, with LoRA on the projections.

The inference core writes a paged KV pool and runs C kernels under inference mode; training
needs gradients instead, so this is the same computation for padded ``[B, L]`` batches:
RMSNorm, fused projections plus LoRA, GGUF pair-order RoPE (``model.apply_rotary``) and
causal ``F.scaled_dot_product_attention``. Its logits are tested against the inference
core's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmos_kernel.core.lora import FUSED, LoraAdapter, part_shapes
from llmos_kernel.core.model import Transformer, apply_rotary


class LoraModel:
    """A frozen base (weights in ``dtype``) and one adapter whose A and B are trained (fp32)."""

    def __init__(self, model: Transformer, adapter: LoraAdapter,
                 dtype: torch.dtype = torch.float32):
        self.model, self.adapter, self.dtype = model, adapter, dtype
        self.cfg = model.config
        self.shapes = part_shapes(self.cfg)
        self.device = model.embed.device
        self.base = {name: p.detach().to(dtype) for name, p in model.named_parameters()}
        for key, t in adapter.weights.items():
            adapter.weights[key] = t.detach().to(self.device).requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.adapter.weights.values())

    def _project(self, x: torch.Tensor, layer: int, module: str, attr: str) -> torch.Tensor:
        y = x @ self.base[f"blocks.{layer}.{module}.{attr}"]
        parts = [p for p in FUSED[attr] if p in self.adapter.targets]
        if not parts:
            return y
        w = self.adapter.weights
        a = torch.cat([w[f"{layer}.{p}.A"] for p in parts], dim=1).to(x.dtype)
        b = torch.block_diag(*[w[f"{layer}.{p}.B"] if p in parts
                               else torch.zeros(0, self.shapes[p][1], device=x.device)
                               for p in FUSED[attr]])
        return y + (x @ a) @ (b.to(x.dtype) * self.adapter.scale)

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps)
        return (out * self.base[name].float()).to(self.dtype)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states ``[B, L, d]`` of a right-padded ``[B, L]`` batch."""
        cfg = self.cfg
        B, L = tokens.shape
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        cos, sin = self.model.rotary.table(torch.arange(L, device=tokens.device))
        x = F.embedding(tokens, self.base["embed"])
        for i in range(cfg.n_layers):
            h = self._norm(x, f"blocks.{i}.attn_norm.weight")
            qkv = self._project(h, i, "attn", "wqkv")
            qk = apply_rotary(qkv[..., :(H + KV) * hd].reshape(B * L, H + KV, hd),
                              cos.repeat(B, 1), sin.repeat(B, 1)).view(B, L, H + KV, hd)
            q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
            v = qkv[..., (H + KV) * hd:].reshape(B, L, KV, hd).transpose(1, 2)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd ** -0.5,
                                                 enable_gqa=True)
            x = x + self._project(att.transpose(1, 2).reshape(B, L, H * hd), i, "attn", "wo")
            h = self._norm(x, f"blocks.{i}.ffn_norm.weight")
            gate, up = self._project(h, i, "ffn", "w_gate_up").chunk(2, dim=-1)
            x = x + self._project(F.silu(gate) * up, i, "ffn", "w_down")
        return self._norm(x, "norm.weight")

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return (h @ self.base["output"]).float()

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy over the labelled positions, and their count
        (the output head runs only on those rows)."""
        h = self.hidden(tokens)[:, :-1]
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.logits(h[keep])
        return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())
