"""A GPT-style decoder step with fixed-size KV caches: the model ``bench_compile.py`` runs.

One call decodes one token per sequence: ``logits = step(tokens, pos)`` with ``tokens`` of
shape ``[batch]`` (int64) and ``pos`` of shape ``[1]`` (int64, the position being written).
Each layer writes its new key and value into its cache buffers *in place* at ``pos``
(``index_copy_``), then attends over the whole cache with a mask that hides positions after
``pos``. Nothing depends on data for its shape: the same kernels run at every position, so the
step can be captured once as a CUDA graph and replayed for every token.

Defaults (the issue's): 6 layers, d_model 512, 8 heads, batch 4, caches of 256 positions,
vocabulary 1024. Built like ``benchmarks/models.py`` builds its models: on the CPU, in
float32, under a fixed seed, then moved, so weights are the same on every device and run.
It lives here rather than in ``models.MODELS``: its mutated buffers and two inputs do not fit
the flat ``forward_flat`` harness the other benchmarks drive every registered model through.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_SEED = 0


@dataclass(frozen=True)
class GPTConfig:
    layers: int = 6
    d_model: int = 512
    heads: int = 8
    batch: int = 4
    max_seq: int = 256
    vocab: int = 1024

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def describe(self) -> str:
        return (f"GPT decoder step: {self.layers} layers, d_model {self.d_model}, {self.heads} heads, "
                f"batch {self.batch}, KV caches of {self.max_seq} positions, vocab {self.vocab}")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.fc2 = nn.Linear(4 * cfg.d_model, cfg.d_model)
        cache_shape = (cfg.batch, cfg.heads, cfg.max_seq, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(cache_shape))
        self.register_buffer("v_cache", torch.zeros(cache_shape))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        batch = x.shape[0]
        q, k, v = self.qkv(self.ln1(x)).split(cfg.d_model, dim=-1)
        # [batch, 1, d_model] -> [batch, heads, 1, head_dim]
        q, k, v = (t.view(batch, 1, cfg.heads, cfg.head_dim).transpose(1, 2) for t in (q, k, v))
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        attn = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=visible)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, 1, cfg.d_model))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPTStep(nn.Module):
    """``forward(tokens [batch], pos [1]) -> logits [batch, vocab]``; caches updated in place."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.register_buffer("positions", torch.arange(cfg.max_seq))
        for module in self.modules():  # GPT-2's initialisation: keeps activations tame
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = (self.tok_emb(tokens) + self.pos_emb(pos)).unsqueeze(1)  # [batch, 1, d_model]
        visible = (self.positions <= pos).view(1, 1, 1, -1)  # positions written so far
        for layer in self.layers:
            x = layer(x, pos, visible)
        return self.head(self.ln_f(x)).squeeze(1)

    @torch.no_grad()
    def clear_caches(self) -> None:
        """Zero every cache in place (addresses unchanged: graphs keep using them)."""
        for layer in self.layers:
            layer.k_cache.zero_()
            layer.v_cache.zero_()

    def caches(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in (layer.k_cache, layer.v_cache)]


def build_gpt(cfg: GPTConfig = GPTConfig(), device: str | torch.device = "cpu", *, seed: int = DEFAULT_SEED) -> GPTStep:
    """Build the model on the CPU under ``seed`` (the caller's RNG left alone), move it, eval()."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTStep(cfg)
    return model.to(device).eval()


def step_inputs(cfg: GPTConfig, device: str | torch.device, step: int, *, seed: int = DEFAULT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of decoding step ``step``: seeded tokens and position ``step % max_seq``."""
    generator = torch.Generator(device="cpu").manual_seed(seed * 100_003 + step)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch,), generator=generator)
    pos = torch.tensor([step % cfg.max_seq])
    return tokens.to(device), pos.to(device)
