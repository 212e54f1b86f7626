"""Gemma 3 text decoders (gemma-3-270m, gemma-3-1b, the text part of the bigger ones) and Gemma 2 in plain torch.

Gemma 3 is the Llama-shaped decoder of llama.py (GQA attention with q/k norms, a gated MLP, rope) with four
differences, each a module here: its RMSNorm scales by (1 + weight) in float32; a block normalises each branch's
output again before adding it back (four norms per block); the embedding is scaled by sqrt(hidden_size); and the
attention layers alternate between a sliding window with a local rope and full attention with the global one
(`ModelConfig.window_of` / `rope_of`, which `Transformer` already follows). The GeGLU activation and the
`query_pre_attn_scalar` attention scale are config fields the shared modules read.

Gemma 2 is the same model without the q/k norms, with one rope for all layers, every other layer windowed, and its
attention scores and final logits soft-capped (`attn_logit_softcapping`, `final_logit_softcapping`: config fields
that llama.py's `Attention` and `Transformer.head` read, models/softcapping.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cake_py.models.config import ModelConfig
from cake_py.models.kv_cache import Batch, LayerCache
from cake_py.models.llama import Block, Transformer


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), all in float32 and then cast (Llama's casts before scaling). The weight is stored
    zero-centred, as in HF checkpoints."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class GemmaBlock(Block):
    """Attention and feed-forward, each between a norm of its input and a norm of its output."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__(config, layer, GemmaRMSNorm)
        self.post_attention_norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_ffn_norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: Batch, caches: list[LayerCache]
    ) -> torch.Tensor:
        h = x + self.post_attention_norm(self.attention(self.attention_norm(x), cos, sin, batch, caches))
        return h + self.post_ffn_norm(self.feed_forward(self.ffn_norm(h)))

    def decode_static(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: torch.Tensor, cache: LayerCache
    ) -> torch.Tensor:
        attended = self.attention.decode_static(self.attention_norm(x), cos, sin, position, cache)
        h = x + self.post_attention_norm(attended)
        return h + self.post_ffn_norm(self.feed_forward(self.ffn_norm(h)))


class GemmaTransformer(Transformer):
    """Layers [start, end) of a Gemma 3 or Gemma 2 model, with the embedding and/or the head when this part holds
    them."""

    norm_type = GemmaRMSNorm
    block_type = GemmaBlock

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T,) token ids → (T, hidden), scaled by sqrt(hidden_size) rounded to the hidden states' dtype first, as
        transformers does (55.4256 is 55.5 in bfloat16, and the checkpoints were trained with that)."""
        hidden = super().embed(tokens)
        scale = torch.tensor(self.config.hidden_size**0.5).to(hidden.dtype).item()
        return hidden * scale
