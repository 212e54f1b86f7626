"""The Llama family of decoders (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3) in plain torch.

A `Transformer` is one stage's part of the model: layers [start, end) plus, optionally, the token embedding and
the head (final norm + lm_head). It never knows where the other layers run. Hidden states use the varlen layout
of `kv_cache.Batch`: (T, hidden) with the tokens of every sequence of the batch concatenated. Gemma 3
(gemma.py) is this decoder with its own norms, block and embedding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cake_py.models import graphs
from cake_py.models.config import ModelConfig
from cake_py.models.graphs import DecodeGraphs
from cake_py.models.kv_cache import Batch, KVStore, LayerCache, decode_step
from cake_py.models.kv_layout import first_read
from cake_py.models.rope import (
    apply_rope,
    longrope_inverse_frequencies,
    rope_inverse_frequencies,
    rope_tables,
    slice_rows,
    with_long_rows,
)
from cake_py.models.softcapping import capped_attention, soft_cap


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like the reference implementation, scale in the weights' dtype.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed


# Decoding sequences whose caches hold at most this many positions attend as one padded batch on a CPU: a pass per
# sequence costs tens of µs in small ops, and past here the padded pass costs more than that
# (benchmarks/long_context.py, 8 sequences, both passes in the fused kernel: padded 1.1x faster at 256-768 positions,
# even at 1024, 0.85x at 1280-4096).
BATCHED_DECODE_MAX_KEYS = 1024


# A norm module of (dim, eps): RMSNorm, or Gemma's.
NormFactory = Callable[[int, float], nn.Module]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, norm: NormFactory = RMSNorm) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.scale = config.attention_scale
        self.sliding_window = config.window_of(layer)
        self.softcap = config.attn_logit_softcapping  # None: SDPA; else the scores are capped (softcapping.py)
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.split_sizes = (q_size, kv_size, kv_size)
        self.wqkv = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.qkv_bias)
        self.wo = nn.Linear(q_size, config.hidden_size, bias=config.o_bias)
        self.q_norm = norm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = norm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T, hidden) → q (T, n_heads, head_dim), k and v (T, n_kv_heads, head_dim), q and k rotated."""
        n_tokens = x.shape[0]
        qkv = self.wqkv(x)
        q_size, kv_size, _ = self.split_sizes
        v = qkv[:, q_size + kv_size :].view(n_tokens, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(qkv[:, :q_size].view(n_tokens, self.n_heads, self.head_dim))
            k = self.k_norm(qkv[:, q_size : q_size + kv_size].view(n_tokens, self.n_kv_heads, self.head_dim))
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
        # Queries and keys side by side: one rotation for both (half the small ops of a decode step).
        qk = qkv[:, : q_size + kv_size].view(n_tokens, self.n_heads + self.n_kv_heads, self.head_dim)
        q, k = apply_rope(qk, cos, sin).split((self.n_heads, self.n_kv_heads), dim=1)
        return q, k, v

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: Batch, caches: list[LayerCache]
    ) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        if len(batch) > 1 and all(p.n_tokens == 1 for p in batch) and self._pads_cheaply(batch, x.device):
            return self.wo(self._batched_decode_attention(q, k, v, batch, caches))
        outputs = []
        offset = 0
        for piece, cache in zip(batch, caches, strict=True):
            end = offset + piece.n_tokens
            q_seq = q[offset:end].transpose(0, 1).unsqueeze(0)  # (1, n_heads, t, head_dim)
            k_seq = k[offset:end].transpose(0, 1).unsqueeze(0)  # (1, n_kv_heads, t, head_dim)
            v_seq = v[offset:end].transpose(0, 1).unsqueeze(0)
            # What its queries read: every position, or the window before its first one: (1, n_kv_heads, L, head_dim)
            keys, values = cache.update(k_seq, v_seq, piece.start_pos)
            key_start = first_read(self.sliding_window, piece.start_pos)
            mask = self._mask(piece.start_pos, piece.n_tokens, key_start, keys.shape[2], x.device)
            if piece.n_tokens == 1 and mask is None and self.softcap is None:
                outputs.append(self._decode_attention(q[offset], keys[0], values[0]))
            else:
                causal = mask is None and piece.n_tokens > 1
                if self.softcap is not None:
                    out = capped_attention(q_seq, keys, values, mask, causal, self.scale, self.softcap)
                else:
                    out = F.scaled_dot_product_attention(
                        q_seq, keys, values, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=True
                    )  # (1, n_heads, t, head_dim)
                outputs.append(out[0].transpose(0, 1).reshape(piece.n_tokens, -1))
            offset = end
        attended = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return self.wo(attended)

    def decode_static(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: torch.Tensor, cache: LayerCache
    ) -> torch.Tensor:
        """One token of one sequence at `position` ((1,) on the device), with fixed shapes and addresses only (what
        a CUDA graph can replay): the new keys/values go in at `position`, and attention reads the whole cache, up
        to its capacity, masking every position after this one (and outside the window). The cache's `start` (a
        window's cache dropped the positions before it) is read once: a graph is recorded again when it moves.
        x: (1, hidden)."""
        q, k, v = self.project(x, cos, sin)
        slot = position - cache.start  # where the position lies in the buffer
        cache.keys.index_copy_(2, slot, k.transpose(0, 1).unsqueeze(0))  # (1, n_kv_heads, 1, head_dim)
        cache.values.index_copy_(2, slot, v.transpose(0, 1).unsqueeze(0))
        key_pos = cache.start + torch.arange(cache.keys.shape[2], device=x.device)
        visible = key_pos <= position
        if self.sliding_window is not None:
            visible &= key_pos > position - self.sliding_window
        query = q.transpose(0, 1).unsqueeze(0)  # (1, n_heads, 1, head_dim)
        mask = visible.view(1, 1, 1, -1)
        if self.softcap is not None:
            out = capped_attention(query, cache.keys, cache.values, visible, False, self.scale, self.softcap)
        else:
            out = F.scaled_dot_product_attention(
                query, cache.keys, cache.values, attn_mask=mask, scale=self.scale, enable_gqa=True
            )
        return self.wo(out.view(1, self.n_heads * self.head_dim))

    def _decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """One query token against its cache in the fused kernel, in the cache's dtype, accumulating in float32 (on a
        CPU 1.06-1.31x the decode step of float32 matmuls, more the longer the cache: benchmarks/decode_attention.py).
        q: (n_heads, head_dim); keys, values: (n_kv_heads, L, head_dim) → (1, n_heads * head_dim)."""
        out = F.scaled_dot_product_attention(
            q[None, :, None], keys[None], values[None], scale=self.scale, enable_gqa=True
        )  # (1, n_heads, 1, head_dim)
        return out.reshape(1, self.n_heads * self.head_dim)

    def _pads_cheaply(self, batch: Batch, device: torch.device) -> bool:
        """Whether decoding sequences attend in one pass over their caches padded to the longest: on a CPU only while
        the caches are short (the padding's work grows with them); on an accelerator always. Never past a sliding
        window."""
        longest = max(p.start_pos for p in batch) + 1
        if self.sliding_window is not None and longest > self.sliding_window:
            return False
        return device.type != "cpu" or longest <= BATCHED_DECODE_MAX_KEYS

    def _batched_decode_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, caches: list[LayerCache]
    ) -> torch.Tensor:
        """One new token for each of n sequences, attended in one pass over their caches padded to the longest.

        q: (n, n_heads, head_dim); k, v: (n, n_kv_heads, head_dim) → (n, n_heads * head_dim).
        """
        starts = [piece.start_pos for piece in batch]
        keys, values, rows = decode_step(caches, starts, k, v)
        positions = torch.tensor(starts, device=q.device)
        # keys, values: (m, n_kv_heads, L, head_dim), sequence i's in row rows[i] (None: row i), finite past its end
        if rows is not None:  # a view of the pool's rows: a query for each, one that reads only key 0 where none
            queries, ends = q.new_zeros(keys.shape[0], *q.shape[1:]), positions.new_zeros(keys.shape[0])
            queries[rows], ends[rows] = q, positions
        else:
            queries, ends = q, positions
        visible = torch.arange(keys.shape[2], device=q.device)[None, :] <= ends[:, None]  # (m, L)
        if self.softcap is None:  # the fused kernel, in the caches' dtype, accumulating in float32
            out = F.scaled_dot_product_attention(
                queries.unsqueeze(2),
                keys,
                values,
                attn_mask=visible[:, None, None, :],
                scale=self.scale,
                enable_gqa=True,
            )  # (m, n_heads, 1, head_dim)
        else:  # capped before the padding is masked, as the reference caps before its mask
            group = self.n_heads // self.n_kv_heads
            grouped = queries.view(-1, self.n_kv_heads, group, self.head_dim).float()  # (m, n_kv_heads, group, hd)
            scores = soft_cap(torch.matmul(grouped, keys.float().transpose(-1, -2)) * self.scale, self.softcap)
            scores.masked_fill_(~visible[:, None, None, :], float("-inf"))  # (m, n_kv_heads, group, L)
            out = torch.matmul(torch.softmax(scores, dim=-1), values.float()).to(v.dtype)
        out = out.reshape(-1, self.n_heads * self.head_dim)
        return out if rows is None else out[rows]

    def _mask(
        self, start_pos: int, n_tokens: int, key_start: int, n_keys: int, device: torch.device
    ) -> torch.Tensor | None:
        """Boolean (t, L) mask of t queries from `start_pos` over L keys from `key_start`, where a plain causal or no
        mask is not enough; None otherwise."""
        window = self.sliding_window
        if n_tokens == 1:
            return None  # a decode step's keys are what it reads: every position, or its window
        if start_pos == 0 and (window is None or n_tokens <= window):
            return None  # a fresh prefill within its window is plain causal (keys and queries both from 0)
        query_pos = torch.arange(start_pos, start_pos + n_tokens, device=device)[:, None]
        key_pos = torch.arange(key_start, key_start + n_keys, device=device)[None, :]
        mask = key_pos <= query_pos
        if window is not None:
            mask &= key_pos > query_pos - window
        return mask


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
}


class FeedForward(nn.Module):
    """A gated MLP: SwiGLU, or GeGLU (Gemma)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.activation = ACTIVATIONS[config.activation]
        self.w13 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)  # gate ‖ up
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.intermediate_size, dim=-1)
        return self.w2(self.activation(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, norm: NormFactory = RMSNorm) -> None:
        super().__init__()
        self.attention_norm = norm(config.hidden_size, config.rms_norm_eps)
        # The absolute layer index: some models window only some layers.
        self.attention = Attention(config, layer, norm)
        self.ffn_norm = norm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward: nn.Module = FeedForward(config)  # or a mixture of experts (moe.py)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: Batch, caches: list[LayerCache]
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, batch, caches)
        return h + self.feed_forward(self.ffn_norm(h))

    def decode_static(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: torch.Tensor, cache: LayerCache
    ) -> torch.Tensor:
        h = x + self.attention.decode_static(self.attention_norm(x), cos, sin, position, cache)
        return h + self.feed_forward(self.ffn_norm(h))


RopeTables = list[tuple[torch.Tensor, torch.Tensor]]  # per rope of `Transformer.ropes`, its cos and sin


class Transformer(nn.Module):
    """Layers [start, end) of a model, with the embedding and/or the head when this part holds them."""

    # What the final norm and the blocks are built from: a family with its own (gemma.py) overrides them.
    norm_type: NormFactory = RMSNorm
    block_type: Callable[[ModelConfig, int], Block] = Block

    def __init__(self, config: ModelConfig, start: int, end: int, *, with_embedding: bool, with_head: bool) -> None:
        super().__init__()
        if not 0 <= start <= end <= config.n_layers:
            raise ValueError(f"layer range [{start}, {end}) is outside the model's {config.n_layers} layers")
        self.config, self.start, self.end = config, start, end
        self.embed_tokens: nn.Embedding | None = None
        if with_embedding:
            # Given a weight, not initialised at random: a model's weights are loaded in place of it (weights.py), and
            # a random init on the meta device, where models are built, imports torch._dynamo (a second and more).
            weight = torch.empty(config.vocab_size, config.hidden_size)
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(type(self).block_type(config, layer) for layer in range(start, end))
        self.norm = type(self).norm_type(config.hidden_size, config.rms_norm_eps) if with_head else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if with_head else None
        # The distinct ropes of these layers (one, or Gemma 3's local and global), and each layer's index among them.
        layer_ropes = [config.rope_of(layer) for layer in range(start, end)]
        self.ropes = list(dict.fromkeys(layer_ropes)) or [config.rope]
        self.layer_ropes = tuple(self.ropes.index(rope) for rope in layer_ropes)
        self.inv_freqs = [rope_inverse_frequencies(rope, config.rotary_dim) for rope in self.ropes]
        # LongRoPE's long-factor frequencies, None for the other ropes.
        self.long_inv_freqs = [
            longrope_inverse_frequencies(rope, config.rotary_dim, long=True) if rope.kind == "longrope" else None
            for rope in self.ropes
        ]
        # Per rope, cos and sin of positions [0, n), (n, 1, head_dim) each, grown on demand: a decode step slices
        # its rows instead of running a dozen small ops per step (per stage, in a cluster). A LongRoPE table has
        # 2n rows: first the rows of one-token steps (short factors before the original context, long ones from
        # it), then the long rows that a slice reaching past the original context takes for all its positions.
        self._rope: RopeTables | None = None
        self._rope_size = 0  # n
        self.cuda_graphs = graphs.enabled()  # on a GPU, replay one sequence's decode steps (models/graphs.py)
        self._decode_graphs: DecodeGraphs | None = None

    @property
    def n_layers(self) -> int:
        return self.end - self.start

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def new_kv_store(self) -> KVStore:
        windows = [self.config.window_of(layer) for layer in range(self.start, self.end)]
        return KVStore(self.n_layers, self.config.n_kv_heads, self.config.head_dim, self.dtype, self.device, windows)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T,) token ids (on any device: the engine builds them on the CPU) → (T, hidden) on this model's device."""
        if self.embed_tokens is None:
            raise RuntimeError("this part of the model does not hold the embedding")
        return self.embed_tokens(tokens.to(self.device, non_blocking=True))

    def forward_layers(self, hidden: torch.Tensor, batch: Batch, kv: KVStore) -> torch.Tensor:
        """Run (T, hidden) through this part's layers, reading and extending each sequence's KV cache."""
        if self.n_layers == 0:
            return hidden
        if self.cuda_graphs and hidden.is_cuda and len(batch) == 1:
            if self._decode_graphs is None:
                self._decode_graphs = DecodeGraphs(self)
            out = self._decode_graphs.run(hidden, batch[0], kv)  # one sequence's decode step, replayed
            if out is not None:
                return out
        ropes = self.rope(batch, hidden)
        per_sequence = kv.for_batch(batch)
        for index, layer in enumerate(self.layers):
            cos, sin = ropes[self.layer_ropes[index]]
            hidden = layer(hidden, cos, sin, batch, [caches[index] for caches in per_sequence])
        return hidden

    def decode_static(self, hidden: torch.Tensor, position: torch.Tensor, caches: list[LayerCache]) -> torch.Tensor:
        """One token of one sequence through this part's layers with fixed shapes and addresses (see
        `Attention.decode_static`); `caches` are the sequence's, one per layer, and their lengths are not updated.
        Run it only after `_rope_tables(end)` for the end of every cache's buffer (`start + capacity`): the tables
        must already cover every position it may be asked."""
        ropes = [  # (1, 1, head_dim) cos and sin per rope
            (cos.index_select(0, position), sin.index_select(0, position)) for cos, sin in self._rope_tables(1, hidden)
        ]
        for layer, cache, rope in zip(self.layers, caches, self.layer_ropes, strict=True):
            assert isinstance(layer, Block)
            hidden = layer.decode_static(hidden, *ropes[rope], position, cache)
        return hidden

    def _rope_tables(self, end: int, like: torch.Tensor) -> RopeTables:
        """Per rope, cos and sin of positions [0, n ≥ end): (n, 1, head_dim) each, on `like`'s device and dtype."""
        tables = self._rope
        if tables is not None and (tables[0][0].dtype != like.dtype or tables[0][0].device != like.device):
            tables = None  # another dtype or device: start over
        if tables is None or self._rope_size < end:
            size = max(end, 2 * self._rope_size if tables is not None else 256)
            positions = torch.arange(size, device=like.device)
            tables = []
            for rope, inv_freq, long_inv_freq in zip(self.ropes, self.inv_freqs, self.long_inv_freqs, strict=True):
                cos, sin = rope_tables(inv_freq.to(like.device), positions, like.dtype, rope.attention_factor)
                if long_inv_freq is not None:
                    long = rope_tables(long_inv_freq.to(like.device), positions, like.dtype, rope.attention_factor)
                    cos, sin = with_long_rows(rope, (cos, sin), long, positions)
                tables.append((cos, sin))
            self._rope, self._rope_size = tables, size
        return tables

    def rope(self, batch: Batch, like: torch.Tensor) -> RopeTables:
        """Per rope, cos and sin for every token of the batch, in layout order: (T, 1, head_dim) each, on `like`'s
        device and dtype. Rows of a table computed once, so equal to computing them for these positions alone."""
        tables = self._rope_tables(max(s.start_pos + s.n_tokens for s in batch), like)
        return [slice_rows(rope, table, self._rope_size, batch) for rope, table in zip(self.ropes, tables, strict=True)]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) → (N, vocab) float32 logits, soft-capped where the model caps them (every sampler and logprob
        reads these)."""
        if self.norm is None or self.lm_head is None:
            raise RuntimeError("this part of the model does not hold the head")
        logits = self.lm_head(self.norm(hidden)).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else soft_cap(logits, cap)

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) after the last layer → (N, hidden) float32 after the final norm: the model's last hidden state
        (transformers' `last_hidden_state`), which embeddings pool."""
        if self.norm is None:
            raise RuntimeError("this part of the model does not hold the final norm")
        return self.norm(hidden).float()
