"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE) in plain torch.

They are the Llama-shaped decoder of llama.py whose feed-forward, in the layers the config makes sparse
(`MoeConfig.is_sparse`), is a `SparseMoE`: a router picks each token's top-k experts (gated MLPs) and sums their
outputs weighted by the routing probabilities, plus, in Qwen2-MoE, a shared expert behind a sigmoid gate. The
routing is transformers' own: a float32 softmax over every router logit, then the top k, renormalised to sum to 1
by Mixtral always and by Qwen with `norm_topk_prob`.

Cost on a CPU: a token computes k experts (k · 3 · hidden · expert_intermediate multiply-adds, a dense MLP k experts
wide, plus hidden · n_experts for the router), and a decode step reads only those k experts' weights, which is what
bounds its speed; memory holds all n_experts. A prefill groups the tokens routed to each expert into one matmul per
expert that any token picked.

A GGUF's 4-bit experts (Q4_0, Q4_1, Q4_K) stay 4-bit on a CPU with 16-bit compute: one `quant.Int4Linear` per expert
and projection, so a step runs only its experts' packs, a prefill the dense unpacking from DENSE_ROWS rows as a
dense layer does, and memory holds about the file's size. Other quantized experts run as int8 rows (an expert given
INT8_DENSE_ROWS rows or more casts them for a dense matmul, as `quant.Int8Linear` does).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from cake_py.models import quant
from cake_py.models.config import ModelConfig
from cake_py.models.config_moe import MoeConfig
from cake_py.models.llama import ACTIVATIONS, Block, FeedForward, Transformer
from cake_py.models.quant import Int4Linear, int8_rows_mm


class SparseMoE(nn.Module):
    """The router (`gate`) and the experts' weights as 3D tensors, one row per expert: `w13` (n_experts,
    2 · expert_intermediate, hidden) holds gate ‖ up, `w2` (n_experts, hidden, expert_intermediate) down. Either may
    instead be one `Int4Linear` per expert (`keep_int4`: a GGUF's 4-bit experts with 16-bit compute on a CPU) or
    int8 rows with a scale each (`keep_int8`: its other quantized experts), run by torch's int8 weight-only kernel as
    `quant.Int8Linear` runs a dense layer's."""

    def __init__(self, config: ModelConfig, moe: MoeConfig) -> None:
        super().__init__()
        self.moe = moe
        self.activation = ACTIVATIONS[config.activation]
        size, hidden = moe.expert_intermediate_size, config.hidden_size
        self.gate = nn.Linear(hidden, moe.n_experts, bias=False)
        # Given a tensor, not initialised: weights are loaded in place of it (see Transformer's embedding).
        self.w13 = nn.Parameter(torch.empty(moe.n_experts, 2 * size, hidden))
        self.w2 = nn.Parameter(torch.empty(moe.n_experts, hidden, size))
        # The int8 forms (n_experts, N, K) and their scales (n_experts, N), where `keep_int8` replaced a weight: set
        # from the loaded weights, not from a state dict (so not persistent: load_state_dict does not look for them).
        for name in ("w13_q8", "w13_scales", "w2_q8", "w2_scales"):
            self.register_buffer(name, None, persistent=False)
        self.w13_q8: torch.Tensor | None
        self.w13_scales: torch.Tensor | None
        self.w2_q8: torch.Tensor | None
        self.w2_scales: torch.Tensor | None
        # The 4-bit forms, where `keep_int4` replaced a weight: a list indexed by expert, so a step picks its packs
        # without copying them.
        self.w13_q4: nn.ModuleList | None = None
        self.w2_q4: nn.ModuleList | None = None
        self.shared_expert: FeedForward | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if moe.shared_expert_intermediate_size is not None:
            shared = dataclasses.replace(config, intermediate_size=moe.shared_expert_intermediate_size)
            self.shared_expert = FeedForward(shared)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, hidden) → each token's routing weights (T, k) and experts (T, k), as transformers routes."""
        probabilities = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # (T, n_experts)
        weights, experts = torch.topk(probabilities, self.moe.top_k, dim=-1)
        if self.moe.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights if self.moe.float32_routing_weights else weights.to(x.dtype)), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        out = self._experts(x, weights, experts)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def keep_int8(self, name: str, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        """Replace weight `name` (w13 or w2) by int8 rows `q` (n_experts, N, K) and their scales (n_experts, N)."""
        delattr(self, name)  # the dense parameter, never loaded
        setattr(self, f"{name}_q8", q)
        setattr(self, f"{name}_scales", scales.to(dtype))

    def keep_int4(self, name: str, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        """Replace weight `name` (w13 or w2) by 4-bit values `q` (n_experts, N, K) with their scale and zero per group
        (n_experts, K/32, N, 2), packed per expert for torch's CPU int4 kernel."""
        delattr(self, name)  # the dense parameter, never loaded
        setattr(self, f"{name}_q4", nn.ModuleList(Int4Linear(q[e], scales[e], None, dtype) for e in range(len(q))))

    def _linear(self, x: torch.Tensor, expert: int, name: str) -> torch.Tensor:
        """x (n, K) times expert `expert`'s (N, K) weight, transposed: its Int4Linear, a view of the dense 3D weight,
        or its int8 rows (from INT8_DENSE_ROWS rows in bfloat16, cast for dense matmuls: `quant.int8_rows_mm`)."""
        int4: nn.ModuleList | None = getattr(self, f"{name}_q4")
        if int4 is not None:
            return int4[expert](x)
        q: torch.Tensor | None = getattr(self, f"{name}_q8")
        scales: torch.Tensor | None = getattr(self, f"{name}_scales")
        if q is None or scales is None:
            return F.linear(x, getattr(self, name)[expert])
        if x.dtype == torch.bfloat16 and x.shape[0] >= quant.INT8_DENSE_ROWS:
            return int8_rows_mm(x, q[expert], scales[expert])
        return torch._weight_int8pack_mm(x, q[expert], scales[expert])

    def _expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `expert`'s gated MLP of (n, hidden): dense weights are views of the 3D tensors, never copied."""
        fused = self._linear(x, expert, "w13")
        gate, up = fused.split(self.moe.expert_intermediate_size, dim=-1)
        return self._linear(self.activation(gate) * up, expert, "w2")

    def _experts(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Σ over each token's k experts of weight · expert(token): (T, hidden). The pairs (token, expert) are sorted
        by expert, and each expert that any token picked runs once over its tokens. As transformers' default
        (grouped) experts do, each pair's weighted output is kept apart and a token's k of them are summed in float32,
        in slot order, then cast: the same result to the last bit in bfloat16 (its eager loop adds in bfloat16)."""
        n_tokens, k = experts.shape
        if n_tokens == 1:
            # A decode step: k experts, no sorting on the device (one small host read of k indices). The weight is
            # (1,)-shaped, not a scalar: Mixtral's float32 weight promotes the product to float32, as in transformers.
            outputs = [
                (self._expert(expert, x) * weights[0, slot : slot + 1]).float()
                for slot, expert in enumerate(experts[0].tolist())
            ]
            return torch.stack(outputs, dim=1).sum(dim=1).to(x.dtype)  # (1, k, hidden) → (1, hidden)
        flat = experts.flatten()  # (T·k,) the expert of each (token, slot) pair, token-major
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert, tokens ascending within a group
        counts = torch.bincount(flat, minlength=self.moe.n_experts).tolist()  # one host read per layer
        flat_weights = weights.flatten()
        pair_outputs = x.new_empty(n_tokens * k, x.shape[1], dtype=torch.float32)  # every pair is written once
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            pairs = order[start : start + count]
            start += count
            contribution = self._expert(expert, x[pairs // k]) * flat_weights[pairs, None]
            pair_outputs[pairs] = contribution.float()
        return pair_outputs.view(n_tokens, k, x.shape[1]).sum(dim=1).to(x.dtype)  # (T, k, hidden) → (T, hidden)


class MoeBlock(Block):
    """A Llama-shaped block whose feed-forward is a `SparseMoE` where the config makes the layer sparse."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__(config, layer)
        if config.moe is not None and config.moe.is_sparse(layer):
            self.feed_forward = SparseMoE(config, config.moe)  # the dense one, built on the meta device, dropped


class MoeTransformer(Transformer):
    """Layers [start, end) of a mixture-of-experts model, with the embedding and/or the head when this part holds
    them. Its decode steps run eagerly, never as CUDA graphs: which experts a step runs is read back from the device
    (a recorded graph would replay the experts of the step it recorded)."""

    block_type = MoeBlock

    def __init__(self, config: ModelConfig, start: int, end: int, *, with_embedding: bool, with_head: bool) -> None:
        super().__init__(config, start, end, with_embedding=with_embedding, with_head=with_head)
        self.cuda_graphs = False
