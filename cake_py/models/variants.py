"""Three Llama variants that people serve, each the Llama decoder of llama.py with config-driven differences.

- SmolLM3 (`SmolLM3ForCausalLM`): some layers rotate no queries and keys (NoPE, `ModelConfig.uses_rope`); the
  others are Llama's. Its windowed layers, when a config has them, are `ModelConfig.window_of`'s.
- Granite (`GraniteForCausalLM`, IBM Granite 3.x): the embedding is multiplied by `embedding_multiplier`, each
  branch's output by `residual_multiplier` before it is added back, the logits divided by `logits_scaling`; the
  attention scale is `attention_multiplier` (`ModelConfig.attention_scale`, which the shared attention reads).
- OLMo 2 (`Olmo2ForCausalLM`, AllenAI): a block normalises each branch's output, not its input, and q and k are
  RMS-normalised over the whole projection (all heads at once) before they are split into heads and rotated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cake_py.models.config import ModelConfig
from cake_py.models.kv_cache import Batch, LayerCache
from cake_py.models.llama import Attention, Block, FeedForward, Transformer
from cake_py.models.rope import apply_rope


class NoRopeAttention(Attention):
    """Attention of a SmolLM3 NoPE layer: its queries and keys are not rotated (the causal mask alone orders them)."""

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T, hidden) → q (T, n_heads, head_dim), k and v (T, n_kv_heads, head_dim); cos and sin are not read."""
        n_tokens = x.shape[0]
        q, k, v = self.wqkv(x).split(self.split_sizes, dim=-1)
        return (
            q.view(n_tokens, self.n_heads, self.head_dim),
            k.view(n_tokens, self.n_kv_heads, self.head_dim),
            v.view(n_tokens, self.n_kv_heads, self.head_dim),
        )


class SmolLM3Block(Block):
    """Llama's block, with attention that rotates nothing on the layers the config marks NoPE."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__(config, layer)
        if not config.uses_rope(layer):
            self.attention = NoRopeAttention(config, layer)


class SmolLM3Transformer(Transformer):
    """Layers [start, end) of a SmolLM3 model, with the embedding and/or the head when this part holds them."""

    block_type = SmolLM3Block


class GraniteBlock(Block):
    """Llama's block with each branch's output multiplied by `residual_multiplier` before it is added back."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__(config, layer)
        self.residual_multiplier = config.residual_multiplier

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: Batch, caches: list[LayerCache]
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, batch, caches) * self.residual_multiplier
        return h + self.feed_forward(self.ffn_norm(h)) * self.residual_multiplier

    def decode_static(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: torch.Tensor, cache: LayerCache
    ) -> torch.Tensor:
        attended = self.attention.decode_static(self.attention_norm(x), cos, sin, position, cache)
        h = x + attended * self.residual_multiplier
        return h + self.feed_forward(self.ffn_norm(h)) * self.residual_multiplier


class GraniteTransformer(Transformer):
    """Layers [start, end) of a Granite model: the embedding scaled up, the logits scaled down."""

    block_type = GraniteBlock

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T,) token ids → (T, hidden), multiplied by `embedding_multiplier` in the hidden states' dtype."""
        return super().embed(tokens) * self.config.embedding_multiplier

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) → (N, vocab) float32 logits, divided by `logits_scaling` in the weights' dtype first, as
        transformers does."""
        if self.norm is None or self.lm_head is None:
            raise RuntimeError("this part of the model does not hold the head")
        return (self.lm_head(self.norm(hidden)) / self.config.logits_scaling).float()


class Olmo2RMSNorm(nn.Module):
    """x / rms(x) * weight, all in float32 and then cast (Llama's casts before scaling)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (self.weight.float() * normed).to(x.dtype)


class Olmo2Attention(Attention):
    """Attention whose q and k norms span the whole projection (n_heads * head_dim wide, n_kv_heads * head_dim)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__(config, layer, Olmo2RMSNorm)
        q_size, kv_size, _ = self.split_sizes
        self.q_norm = Olmo2RMSNorm(q_size, config.rms_norm_eps)
        self.k_norm = Olmo2RMSNorm(kv_size, config.rms_norm_eps)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T, hidden) → q (T, n_heads, head_dim), k and v (T, n_kv_heads, head_dim), q and k normed, then rotated."""
        n_tokens = x.shape[0]
        q, k, v = self.wqkv(x).split(self.split_sizes, dim=-1)
        if self.q_norm is None or self.k_norm is None:  # always set in __init__; for the type checker
            raise RuntimeError("OLMo 2 attention lost its q/k norms")
        q = self.q_norm(q).view(n_tokens, self.n_heads, self.head_dim)
        k = self.k_norm(k).view(n_tokens, self.n_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.view(n_tokens, self.n_kv_heads, self.head_dim)


class Olmo2Block(Block):
    """Attention and feed-forward, each followed by a norm of its output before the residual add (no input norms)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        nn.Module.__init__(self)  # not Block's: OLMo 2 has no norm before either branch
        self.attention = Olmo2Attention(config, layer)
        self.post_attention_norm = Olmo2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)
        self.post_ffn_norm = Olmo2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: Batch, caches: list[LayerCache]
    ) -> torch.Tensor:
        h = x + self.post_attention_norm(self.attention(x, cos, sin, batch, caches))
        return h + self.post_ffn_norm(self.feed_forward(h))

    def decode_static(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: torch.Tensor, cache: LayerCache
    ) -> torch.Tensor:
        h = x + self.post_attention_norm(self.attention.decode_static(x, cos, sin, position, cache))
        return h + self.post_ffn_norm(self.feed_forward(h))


class Olmo2Transformer(Transformer):
    """Layers [start, end) of an OLMo 2 model, with the embedding and/or the head when this part holds them."""

    norm_type = Olmo2RMSNorm
    block_type = Olmo2Block
