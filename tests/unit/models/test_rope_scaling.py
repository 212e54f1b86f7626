"""The long-context rope scalings (YaRN, LongRoPE) against transformers, the reference nobody here wrote: their
frequencies and attention factors for the fields configs use, and LongRoPE's choice between its short and long
factors through a KV cache, in batches, and in the fixed-shape decode step of CUDA graphs.

The tiny LongRoPE model's original context is 16 positions: prompts of 12 tokens stay within it, of 24 pass it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from cake_py.errors import ModelError, UnsupportedArchitectureError
from cake_py.models import graphs
from cake_py.models.config import ModelConfig, RopeConfig
from cake_py.models.gguf import GGUFWeights
from cake_py.models.kv_cache import SequenceSlice
from cake_py.models.rope import longrope_inverse_frequencies, rope_inverse_frequencies
from tests.fixtures.gguf_files import write_file
from tests.unit.models.test_parity import load_ours, load_reference, reference_logits, run

transformers = pytest.importorskip("transformers")
rope_utils = pytest.importorskip("transformers.modeling_rope_utils")

SIZES = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1}
ORIGINAL = 16  # the tiny LongRoPE model's original context


def frequencies_of(raw: dict[str, Any], long: bool = False) -> tuple[torch.Tensor, float]:
    config = ModelConfig.from_hf(raw)
    if long:
        return longrope_inverse_frequencies(config.rope, config.head_dim, long=True), config.rope.attention_factor
    return rope_inverse_frequencies(config.rope, config.head_dim), config.rope.attention_factor


YARN = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 4096}


@pytest.mark.parametrize(
    "rope",
    [
        YARN,  # Qwen2.5's model card
        {**YARN, "beta_fast": 16, "beta_slow": 2, "truncate": False},
        {**YARN, "rope_theta": 1e4, "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707},  # DeepSeek's distills
        {**YARN, "factor": 8.0, "mscale": 1.0, "mscale_all_dim": 0.5},
        {**YARN, "attention_factor": 0.8},
        {**YARN, "factor": None},  # the ratio of max_position_embeddings to the original context
        {**YARN, "beta_fast": 0},  # 0 is the paper's default, as transformers reads it
    ],
    ids=["qwen", "betas-untruncated", "deepseek-mscale", "mscale-ratio", "attention-factor", "no-factor", "beta-0"],
)
def test_yarn_frequencies_and_attention_factor_match_transformers(rope: dict[str, Any]) -> None:
    reference = transformers.Qwen2Config(**SIZES, max_position_embeddings=32768, rope_parameters=dict(rope))
    expected_freqs, expected_factor = rope_utils.ROPE_INIT_FUNCTIONS["yarn"](reference, "cpu")
    inv_freq, factor = frequencies_of(reference.to_dict())
    torch.testing.assert_close(inv_freq, expected_freqs, rtol=0, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)
    assert factor != 1.0 or rope.get("mscale") == rope.get("mscale_all_dim")  # equal weights cancel out
    assert not torch.allclose(inv_freq, rope_inverse_frequencies(RopeConfig(theta=rope["rope_theta"]), 64))


SHORT, LONG = [1.0 + 0.1 * i for i in range(32)], [1.0 + 2.0 * i for i in range(32)]
LONGROPE = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": SHORT, "long_factor": LONG}


@pytest.mark.parametrize(
    ("config_class", "fields"),
    [
        # Phi-3's own config: the original context at the top level, no factor (the ratio of the contexts).
        ("Phi3Config", {"original_max_position_embeddings": 4096, "rope_parameters": {**LONGROPE}}),  # it writes in
        ("LlamaConfig", {"rope_parameters": {**LONGROPE, "original_max_position_embeddings": 4096, "factor": 8.0}}),
        (
            "LlamaConfig",
            {"rope_parameters": {**LONGROPE, "original_max_position_embeddings": 4096, "attention_factor": 1.2}},
        ),
    ],
    ids=["phi3", "factor", "attention-factor"],
)
def test_longrope_frequencies_and_attention_factor_match_transformers(
    config_class: str, fields: dict[str, Any]
) -> None:
    reference = getattr(transformers, config_class)(**SIZES, max_position_embeddings=131072, **fields)
    compute = rope_utils.ROPE_INIT_FUNCTIONS["longrope"]
    raw = reference.to_dict()
    for long, seq_len in ((False, None), (True, 4097)):
        expected_freqs, expected_factor = compute(reference, "cpu", seq_len=seq_len)
        inv_freq, factor = frequencies_of(raw, long)
        torch.testing.assert_close(inv_freq, expected_freqs, rtol=0, atol=0)
        assert factor == pytest.approx(expected_factor, rel=1e-12) and factor > 1.0


def test_a_phi3_config_without_its_original_context_takes_phi3configs_4096() -> None:
    """Phi3Config defaults original_max_position_embeddings to 4096 (not max_position_embeddings): LongRoPE's factor,
    attention factor and the length past which the long factors apply all follow it."""
    raw = {**SIZES, "vocab_size": 64, "intermediate_size": 64, "max_position_embeddings": 131072}
    raw["rope_scaling"] = dict(LONGROPE)  # without the field
    reference = transformers.Phi3Config(**copy.deepcopy(raw))  # it writes its defaults into the dicts it is given
    config = ModelConfig.from_hf({"architectures": ["Phi3ForCausalLM"], **raw})
    original = reference.rope_parameters["original_max_position_embeddings"]
    assert config.rope.original_max_position_embeddings == original == 4096
    _, expected_factor = rope_utils.ROPE_INIT_FUNCTIONS["longrope"](reference, "cpu")
    assert config.rope.attention_factor == pytest.approx(expected_factor, rel=1e-12) and expected_factor > 1.0


def test_llama3_scaling_without_its_original_context_takes_max_position_embeddings() -> None:
    """transformers fills a llama3 rope's missing original_max_position_embeddings with max_position_embeddings (a
    top-level one winning), not 8192: the wavelengths it smooths between follow it."""
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    raw = {**SIZES, "vocab_size": 64, "intermediate_size": 64, "max_position_embeddings": 32768}
    for top_level in ({}, {"original_max_position_embeddings": 2048}):
        reference = transformers.LlamaConfig(**raw, **top_level, rope_parameters=dict(rope))
        expected, _ = rope_utils.ROPE_INIT_FUNCTIONS["llama3"](reference, "cpu")
        config = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], **raw, **top_level, "rope_scaling": rope})
        assert config.rope.original_max_position_embeddings == top_level.get("original_max_position_embeddings", 32768)
        torch.testing.assert_close(rope_inverse_frequencies(config.rope, config.head_dim), expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def longrope_model(tiny_model_factory) -> Path:
    return tiny_model_factory("longrope")


def greedy(model: Any, prompt: torch.Tensor, n: int) -> list[int]:
    """Our greedy tokens: the prompt in one slice, then one token per step through the KV cache."""
    kv, tokens = model.new_kv_store(), []
    (logits,) = run(model, kv, [(0, 0, prompt)])
    for _ in range(n):
        last = logits[-1].clone()
        last[list(model.config.eos_token_ids)] = float("-inf")
        tokens.append(int(last.argmax()))
        (logits,) = run(model, kv, [(0, len(prompt) + len(tokens) - 1, torch.tensor(tokens[-1:]))])
    return tokens


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("length", [12, 24], ids=["within", "past"])
@torch.inference_mode()
def test_longrope_prompt_and_greedy_decoding_past_the_original_context_match_transformers(
    longrope_model: Path, length: int
) -> None:
    """transformers picks the factors of a forward pass by its largest position + 1: a prompt within the original
    context is rotated with the short ones, one past it with the long ones (all its positions), and each decode step
    from position 16 on with the long ones, its cache keeping what the prompt's keys were rotated with (as Llama's
    `generate` does; the engine computes such a sequence again, as Phi-3's does: tests/unit/engine/test_long_rope.py).
    """
    ours, reference = load_ours(longrope_model), load_reference(longrope_model)
    prompt = tokens(length, seed=length)
    (logits,) = run(ours, ours.new_kv_store(), [(0, 0, prompt)])
    torch.testing.assert_close(logits, reference_logits(reference, prompt), rtol=0, atol=1e-4)
    n = 40 - length  # past the original context either way
    expected = reference.generate(
        prompt[None], attention_mask=torch.ones(1, length, dtype=torch.long), do_sample=False,
        max_new_tokens=n, min_new_tokens=n,
    )[0, length:].tolist()  # fmt: skip
    assert greedy(ours, prompt, n) == expected


@torch.inference_mode()
def test_longrope_judges_each_sequence_of_a_batch_by_its_own_length(longrope_model: Path) -> None:
    """A sequence within the original context and one past it, in one call: each is rotated as transformers rotates
    it alone (transformers itself, given them as one padded batch, would rotate both with the long factors)."""
    ours, reference = load_ours(longrope_model), load_reference(longrope_model)
    within, past = tokens(12, seed=1), tokens(24, seed=2)
    together = run(ours, ours.new_kv_store(), [(1, 0, within), (2, 0, past)])
    for ids, logits in zip((within, past), together, strict=True):
        torch.testing.assert_close(logits, reference_logits(reference, ids), rtol=0, atol=1e-4)
    # The short and long rotations differ at these sizes: the batch did not pass by rotating both alike.
    assert not torch.allclose(together[0], run(ours, ours.new_kv_store(), [(0, 0, tokens(24, seed=1))])[0][:12])


def test_the_static_decode_step_follows_longrope_past_the_original_context(longrope_model: Path) -> None:
    """The fixed-shape step CUDA graphs record reads the short rows before position 16 and the long ones from it,
    as the eager step does."""
    layers = load_ours(longrope_model)
    generator = torch.Generator().manual_seed(0)
    hidden = layers.config.hidden_size
    eager_kv, static_kv = layers.new_kv_store(), layers.new_kv_store()
    prompt = layers.embed(tokens(10, seed=3))
    for kv in (eager_kv, static_kv):
        layers.forward_layers(prompt, [SequenceSlice(1, 0, 10)], kv)
    static_steps = 0
    for position in range(10, 30):
        x = torch.randn(1, hidden, generator=generator)
        eager = layers.forward_layers(x, [SequenceSlice(1, position, 1)], eager_kv)
        caches = static_kv.caches_of(1)
        assert caches is not None
        if any(graphs._full(cache, position) for cache in caches):  # as DecodeGraphs.run: a full buffer grows eagerly
            static = layers.forward_layers(x, [SequenceSlice(1, position, 1)], static_kv)
        else:
            static_steps += 1
            layers._rope_tables(max(cache.keys.shape[2] for cache in caches), x)
            static = layers.decode_static(x, torch.tensor([position]), caches)
            for cache in caches:
                cache.length = position + 1
        torch.testing.assert_close(static, eager, atol=1e-4, rtol=1e-4)
    assert static_steps >= 10  # most steps, on both sides of position 16


@pytest.mark.parametrize(
    ("rope", "needle"),
    [
        (
            {**LONGROPE, "short_factor": SHORT[:-1]},
            "short_factor has 31 factors for 64 rotated dimensions (it takes 32)",
        ),
        ({**LONGROPE, "long_factor": "x"}, "long_factor must be a list of numbers, got 'x'"),
        ({**LONGROPE, "long_factor": [0.0] * 32}, "long_factor must be a finite number > 0, got 0.0"),
        ({**YARN, "beta_slow": -1}, "beta_slow must be a finite number > 0, got -1.0"),
        ({**YARN, "truncate": "no"}, "truncate must be true or false, got 'no'"),
        ({**YARN, "original_max_position_embeddings": 0}, "original_max_position_embeddings must be at least 1, got 0"),
        (
            {**LONGROPE, "original_max_position_embeddings": 1},
            "original_max_position_embeddings must be at least 2, got 1",
        ),
        ({**YARN, "rope_theta": 1}, "rope_theta must not be 1 with yarn rope scaling"),
        ({**YARN, "attention_factor": -2}, "attention_factor must be a finite number > 0, got -2.0"),
    ],
)
def test_a_bad_scaling_field_is_named(rope: dict[str, Any], needle: str) -> None:
    raw = {**SIZES, "architectures": ["LlamaForCausalLM"], "vocab_size": 384, "intermediate_size": 160}
    with pytest.raises(ModelError) as raised:
        ModelConfig.from_hf({**raw, "rope_scaling": rope}, "config.json")
    assert str(raised.value).startswith("config.json") and needle in str(raised.value), raised.value


@pytest.mark.parametrize("kind", ["linear", "llama3"])
def test_a_phi3_config_with_another_scaling_than_longrope_is_refused(kind: str) -> None:
    """transformers' Phi3Config refuses it (Phi3Config.validate_rope): none is published, and what it would mean for
    Phi-3 is nobody's reference."""
    raw = {**SIZES, "architectures": ["Phi3ForCausalLM"], "vocab_size": 384, "intermediate_size": 160}
    scaling = {"rope_type": kind, "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    with pytest.raises(UnsupportedArchitectureError, match=f"unsupported rope_scaling type '{kind}' for Phi-3"):
        ModelConfig.from_hf({**raw, "rope_scaling": scaling})
    with pytest.raises(StrictDataclassClassValidationError, match="must be one of"):  # the reference agrees
        transformers.Phi3Config(**{**raw, "rope_scaling": scaling})


def test_dynamic_ntk_is_refused_saying_why() -> None:
    raw = {**SIZES, "architectures": ["LlamaForCausalLM"], "vocab_size": 384, "intermediate_size": 160}
    with pytest.raises(UnsupportedArchitectureError) as raised:
        ModelConfig.from_hf({**raw, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    assert "'dynamic'" in str(raised.value) and "KV cache" in str(raised.value)


def write_rope_gguf(path: Path, keys: dict[str, Any]) -> Path:
    """A metadata-only llama GGUF of an 8192-position context with the `llama.`-prefixed `keys`."""
    writer = gguf.GGUFWriter(path, "llama")
    for add, value in [("block_count", 1), ("embedding_length", 256), ("feed_forward_length", 128), ("head_count", 4)]:
        getattr(writer, f"add_{add}")(value)
    writer.add_vocab_size(8)
    writer.add_context_length(8192)
    for key, value in keys.items():
        add = writer.add_string if isinstance(value, str) else writer.add_uint32 if isinstance(value, int) else None
        (add or writer.add_float32)(f"llama.{key}", value)
    write_file(writer)
    return path


YARN_GGUF = {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 2048}


@pytest.mark.parametrize(
    "keys",
    [YARN_GGUF, {**YARN_GGUF, "rope.scaling.yarn_beta_fast": 16.0, "rope.scaling.yarn_beta_slow": 2.0}],
    ids=["yarn", "betas"],
)
def test_yarn_from_a_gguf_is_the_hf_config_it_was_converted_from(keys: dict[str, Any], tmp_path: Path) -> None:
    """llama.cpp's converter writes a YaRN rope_scaling's factor, original context and betas as rope.scaling.*
    metadata: read back, they rotate as the HF config does."""
    rope = ModelConfig.from_hf(GGUFWeights(write_rope_gguf(tmp_path / "yarn.gguf", keys)).config).rope
    hf = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    if "rope.scaling.yarn_beta_fast" in keys:
        hf |= {"beta_fast": 16.0, "beta_slow": 2.0}
    raw = {**SIZES, "architectures": ["LlamaForCausalLM"], "vocab_size": 8, "intermediate_size": 128}
    assert rope == ModelConfig.from_hf({**raw, "max_position_embeddings": 8192, "rope_scaling": hf}).rope
    assert rope.kind == "yarn" and rope.attention_factor > 1


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("rope.scaling.yarn_attn_factor", 0.8),
        ("rope.scaling.yarn_log_multiplier", 0.1),
        ("rope.scaling.yarn_ext_factor", 0.5),
    ],
)
def test_a_yarn_gguf_key_computed_otherwise_is_refused_naming_it(key: str, value: float, tmp_path: Path) -> None:
    path = write_rope_gguf(tmp_path / "yarn.gguf", {**YARN_GGUF, key: value})
    with pytest.raises(UnsupportedArchitectureError) as raised:
        ModelConfig.from_hf(GGUFWeights(path).config)
    assert f"llama.{key} = {value}" in str(raised.value)


PHI3 = {**SIZES, "architectures": ["Phi3ForCausalLM"], "vocab_size": 384, "intermediate_size": 160}


@pytest.mark.parametrize("name", ["su", "yarn"])
def test_a_phi3_config_naming_longrope_by_its_older_names_reads_as_longrope(name: str) -> None:
    """Phi-3 configs written before "longrope" say "su" (Phi-3-medium-128k) or "yarn"; transformers' Phi3Config renames
    both LongRoPE (5.23 then fails its own check of an "su" config, having looked for the original context first)."""
    scaling = {"type": name, "short_factor": SHORT, "long_factor": LONG}
    raw = {**PHI3, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rope_scaling": scaling}
    rope = ModelConfig.from_hf(raw).rope
    assert rope.kind == "longrope" and rope.long_factor == tuple(LONG) and rope.original_max_position_embeddings == 4096
    if name == "yarn":
        reference = transformers.Phi3Config(**{k: v for k, v in raw.items() if k != "architectures"})
        assert reference.rope_parameters["rope_type"] == "longrope"
        expected_freqs, expected_factor = rope_utils.ROPE_INIT_FUNCTIONS["longrope"](reference, "cpu", seq_len=4097)
        torch.testing.assert_close(longrope_inverse_frequencies(rope, 64, long=True), expected_freqs, rtol=0, atol=0)
        assert rope.attention_factor == pytest.approx(expected_factor, rel=1e-12)


@pytest.mark.parametrize(
    ("share", "needle"),
    [
        (0.0, "partial_rotary_factor 0.0 rotates 0 of a head's 64 dimensions"),
        (0.99, "partial_rotary_factor 0.99 rotates 63 of a head's 64 dimensions"),
        (1.5, "partial_rotary_factor 1.5 rotates 96 of a head's 64 dimensions"),
        ("half", "partial_rotary_factor must be a number, got 'half'"),
    ],
)
def test_a_rotated_share_that_does_not_fit_the_heads_is_named(share: object, needle: str) -> None:
    with pytest.raises(ModelError) as raised:
        ModelConfig.from_hf({**PHI3, "partial_rotary_factor": share}, "config.json")
    assert needle in str(raised.value), raised.value
