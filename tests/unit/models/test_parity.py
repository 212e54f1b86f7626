"""Parity of our Llama-family model code with transformers, for every architecture we claim.

Each tiny model (see tests/fixtures/tiny_models.py) is run by `cake_py.models` and by transformers' own
`AutoModelForCausalLM` in float32; logits must agree to float32 precision and greedy tokens exactly, through
prefill, the KV cache, varlen batches and a model split into two stages.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from cake_py.models import llama
from cake_py.models.config import ModelConfig, RopeConfig
from cake_py.models.kv_cache import KVStore, SequenceSlice
from cake_py.models.llama import Transformer
from cake_py.models.rope import rope_inverse_frequencies
from cake_py.models.safetensors_folder import SafetensorsWeights
from cake_py.models.weights import load_transformer
from tests.fixtures.tiny_models import KINDS, reference_class

transformers = pytest.importorskip("transformers")

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
N_GREEDY = 32


@dataclass
class Pair:
    """Our model and the transformers reference for one tiny model folder, plus a prompt in its tokens."""

    kind: str
    folder: Path
    config: ModelConfig
    ours: Transformer
    reference: torch.nn.Module
    prompt: torch.Tensor  # (T,) int64


def load_ours(folder: Path, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None) -> Transformer:
    source = SafetensorsWeights(folder)
    config = ModelConfig.from_hf(source.config)
    end = config.n_layers if end is None else end
    return load_transformer(
        source, config, start, end, with_embedding=start == 0, with_head=end == config.n_layers, dtype=dtype
    )


def load_reference(folder: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return reference_class(transformers.AutoConfig.from_pretrained(folder)).from_pretrained(folder, dtype=dtype).eval()


def encode_prompt(folder: Path) -> torch.Tensor:
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROMPT).ids
    return torch.tensor(ids, dtype=torch.long)


@pytest.fixture(scope="module", params=KINDS)
def pair(request: pytest.FixtureRequest, tiny_model_factory) -> Pair:
    folder = tiny_model_factory(request.param)
    ours = load_ours(folder)
    return Pair(request.param, folder, ours.config, ours, load_reference(folder), encode_prompt(folder))


def run(model: Transformer, kv: KVStore, pieces: list[tuple[int, int, torch.Tensor]]) -> list[torch.Tensor]:
    """One varlen forward of (seq_id, start_pos, ids) pieces; each piece's (n, vocab) logits."""
    batch = [SequenceSlice(seq_id, start, len(ids)) for seq_id, start, ids in pieces]
    logits = model.head(model.forward_layers(model.embed(torch.cat([ids for _, _, ids in pieces])), batch, kv))
    return list(logits.split([len(ids) for _, _, ids in pieces]))


def reference_logits(reference: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """transformers' full-sequence float32 logits: (T, vocab)."""
    return reference(ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0].float()


def assert_logits_close(ours: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-4) -> None:
    """Absolute tolerance relative to the logits' scale (a few units for these models)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(ours, expected, rtol=0.0, atol=tolerance * scale)


def continuation(pair: Pair, length: int, seed: int = 7) -> torch.Tensor:
    """The prompt followed by deterministic random tokens, `length` tokens in all."""
    generator = torch.Generator().manual_seed(seed)
    extra = torch.randint(0, pair.config.vocab_size, (length - len(pair.prompt),), generator=generator)
    return torch.cat([pair.prompt, extra])


def test_fixture_exercises_the_architecture(pair: Pair) -> None:
    """Guard against a fixture too gentle for parity to catch anything."""
    config = pair.config
    assert config.vocab_size == Tokenizer.from_file(str(pair.folder / "tokenizer.json")).get_vocab_size()
    assert 12 <= len(pair.prompt) <= 30
    norms = [p for name, p in pair.reference.named_parameters() if "norm" in name]
    assert norms and all(not torch.allclose(p, torch.ones_like(p)) for p in norms)
    if pair.kind == "llama3":
        default = rope_inverse_frequencies(RopeConfig(theta=config.rope.theta), config.head_dim)
        assert config.rope.kind == "llama3"
        assert not torch.allclose(rope_inverse_frequencies(config.rope, config.head_dim), default)
    if pair.kind == "yarn":  # frequencies interpolated in part, cos and sin scaled
        default = rope_inverse_frequencies(RopeConfig(theta=config.rope.theta), config.head_dim)
        scaled = rope_inverse_frequencies(config.rope, config.head_dim)
        assert config.rope.kind == "yarn" and config.rope.attention_factor > 1
        assert scaled[0] == default[0] and scaled[-1] == default[-1] / config.rope.factor
    if pair.kind == "phi3":  # fused checkpoint projections, a partial rotation, LongRoPE's scaled cos and sin
        names = SafetensorsWeights(pair.folder).names()
        assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
        assert config.rotary_dim == 12 < config.head_dim and config.rope.kind == "longrope"
        assert config.rope.attention_factor > 1 and config.rope.original_max_position_embeddings == 64
    if pair.kind == "smollm":
        assert config.tie_word_embeddings and "lm_head.weight" not in SafetensorsWeights(pair.folder).names()
    if pair.kind in ("mistral", "qwen2", "qwen3", "mistral3_vision"):
        assert config.sliding_window is not None and config.sliding_window < len(pair.prompt) + N_GREEDY
        # Mistral windows every layer; Qwen only from max_window_layers (1) on, as transformers decides.
        mistral = pair.kind in ("mistral", "mistral3_vision")
        expected = [config.sliding_window] * 3 if mistral else [None, config.sliding_window]
        assert [config.window_of(layer) for layer in range(config.n_layers)] == expected
    if pair.kind == "qwen2":
        biases = [p for name, p in pair.reference.named_parameters() if name.endswith("proj.bias")]
        assert config.qkv_bias and biases and all(p.abs().min() > 0 for p in biases)
    if pair.kind == "qwen3":
        assert config.qk_norm and config.n_heads * config.head_dim != config.hidden_size
    if pair.kind == "gemma3":
        # Sliding layers around a full one, each kind with its own rope, a window the prompts outgrow.
        assert [config.window_of(layer) for layer in range(config.n_layers)] == [16, None, 16]
        assert config.sliding_window is not None and config.sliding_window < len(pair.prompt) + N_GREEDY
        assert config.rope_of(0) == config.rope_of(2) != config.rope_of(1)
        assert (config.rope_of(0).theta, config.rope_of(1).kind) == (1e4, "linear")
        assert config.attention_scale != config.head_dim**-0.5 and config.activation == "gelu_tanh"
        assert config.tie_word_embeddings and "lm_head.weight" not in SafetensorsWeights(pair.folder).names()
    if pair.kind in ("gemma3_vision", "mistral3_vision"):
        # The multimodal checkpoints: the reference carries a vision tower and projector that are never loaded here.
        assert type(pair.reference).__name__ == config.architecture == pair.reference.config.architectures[0]
        assert any(name.startswith("model.vision_tower.") for name, _ in pair.reference.named_parameters())
        names = SafetensorsWeights(pair.folder).names()
        assert "model.layers.0.self_attn.q_proj.weight" in names
        assert not any("vision" in name or "projector" in name for name in names)
    if pair.kind == "mistral3_vision":  # Mistral Small's head is its own: stored as language_model.lm_head
        assert not config.tie_word_embeddings and "lm_head.weight" in SafetensorsWeights(pair.folder).names()
    if pair.kind == "gemma3_vision":
        assert [config.window_of(layer) for layer in range(config.n_layers)] == [16, None, 16]
    if pair.kind == "gemma2":
        # Every other layer windowed from layer 0 (Gemma2Config's default), one rope, and caps that bend the logits:
        # the same weights uncapped are far from the reference.
        assert [config.window_of(layer) for layer in range(config.n_layers)] == [16, None, 16]
        assert config.sliding_window is not None and config.sliding_window < len(pair.prompt) + N_GREEDY
        assert len(pair.ours.ropes) == 1 and not config.qk_norm and config.attention_scale != config.head_dim**-0.5
        assert config.attn_logit_softcapping is not None and config.final_logit_softcapping is not None
        expected = reference_logits(pair.reference, pair.prompt)
        for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
            uncapped = load_transformer(
                SafetensorsWeights(pair.folder), replace(config, **{cap: None}), 0, config.n_layers,
                with_embedding=True, with_head=True, dtype=torch.float32,
            )  # fmt: skip
            (logits,) = run(uncapped, uncapped.new_kv_store(), [(0, 0, pair.prompt)])
            assert (logits - expected).abs().max() > 0.05 * expected.abs().max()
    assert config.n_kv_heads < config.n_heads


def test_tokenizer_is_real_hf_format(tiny_llama: Path) -> None:
    """transformers reads the fixture's tokenizer files as a ChatML tokenizer ending turns with <|im_end|>."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith(PROMPT)
    assert (tokenizer.eos_token, tokenizer.bos_token) == ("<|im_end|>", None)
    assert tokenizer.eos_token_id == 2 == ModelConfig.from_hf(SafetensorsWeights(tiny_llama).config).eos_token_ids[0]
    assert tokenizer(PROMPT).input_ids == encode_prompt(tiny_llama).tolist()
    assert encode_prompt(tiny_llama)[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


@torch.inference_mode()
def test_prefill_logits_match(pair: Pair) -> None:
    (logits,) = run(pair.ours, pair.ours.new_kv_store(), [(0, 0, pair.prompt)])
    assert_logits_close(logits, reference_logits(pair.reference, pair.prompt))


@torch.inference_mode()
def test_cached_decode_logits_match(pair: Pair) -> None:
    """Prefill a prefix, then a chunk at a nonzero position, then one token at a time through the KV cache."""
    ids = continuation(pair, len(pair.prompt) + N_GREEDY)
    expected = reference_logits(pair.reference, ids)
    kv = pair.ours.new_kv_store()
    steps = [(0, 8), (8, 14)] + [(position, position + 1) for position in range(14, len(ids))]
    for start, end in steps:
        (logits,) = run(pair.ours, kv, [(0, start, ids[start:end])])
        assert_logits_close(logits, expected[start:end])
    assert kv.length(0) == len(ids)


@torch.inference_mode()
def test_greedy_tokens_match_generate(pair: Pair) -> None:
    prompt = pair.prompt
    generated = pair.reference.generate(
        prompt[None],
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=N_GREEDY,
        min_new_tokens=N_GREEDY,
    )[0, len(prompt) :].tolist()

    # min_new_tokens keeps generate going by masking the end-of-sequence tokens: do the same.
    eos_ids = list(pair.config.eos_token_ids)
    kv = pair.ours.new_kv_store()
    ours: list[int] = []
    (logits,) = run(pair.ours, kv, [(0, 0, prompt)])
    for _ in range(N_GREEDY):
        last = logits[-1].clone()
        last[eos_ids] = float("-inf")
        ours.append(int(last.argmax()))
        (logits,) = run(pair.ours, kv, [(0, len(prompt) + len(ours) - 1, torch.tensor(ours[-1:]))])
    assert ours == generated
    assert len(set(ours)) > N_GREEDY // 4, "greedy decoding collapsed: the fixture is too weak to test parity"


@torch.inference_mode()
def test_batched_sequences_match_running_each_alone(pair: Pair) -> None:
    first, second = pair.prompt[:13], continuation(pair, 40)
    together = run(pair.ours, pair.ours.new_kv_store(), [(1, 0, first), (2, 0, second)])
    for ids, logits in zip((first, second), together, strict=True):
        (alone,) = run(pair.ours, pair.ours.new_kv_store(), [(0, 0, ids)])
        assert_logits_close(logits, alone, tolerance=1e-5)
        assert_logits_close(logits, reference_logits(pair.reference, ids))


@torch.inference_mode()
def test_mixed_decode_and_prefill_batch(pair: Pair) -> None:
    """One sequence decoding, one prefilling from scratch and one continuing a chunked prefill, in one call."""
    decoding, fresh, chunked = pair.prompt, continuation(pair, 30, seed=1), continuation(pair, 35, seed=2)
    kv = pair.ours.new_kv_store()
    run(pair.ours, kv, [(1, 0, decoding[:-1]), (3, 0, chunked[:20])])
    pieces = [(1, len(decoding) - 1, decoding[-1:]), (2, 0, fresh), (3, 20, chunked[20:])]
    decode_logits, fresh_logits, chunk_logits = run(pair.ours, kv, pieces)
    assert_logits_close(decode_logits, reference_logits(pair.reference, decoding)[-1:])
    assert_logits_close(fresh_logits, reference_logits(pair.reference, fresh))
    assert_logits_close(chunk_logits, reference_logits(pair.reference, chunked)[20:])
    assert [kv.length(seq) for seq in (1, 2, 3)] == [len(decoding), len(fresh), len(chunked)]


@pytest.mark.parametrize("padded", [True, False], ids=["one padded pass", "one pass per sequence"])
@torch.inference_mode()
def test_several_sequences_decoding_together(pair: Pair, padded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three sequences of different lengths decoding in one call: attending as one padded batch (short caches on a
    CPU) or one sequence at a time (long ones) gives the same logits."""
    monkeypatch.setattr(llama, "BATCHED_DECODE_MAX_KEYS", 10**6 if padded else 0)
    passes = []
    padded_pass = llama.Attention._batched_decode_attention
    monkeypatch.setattr(
        llama.Attention,
        "_batched_decode_attention",
        lambda self, *args: passes.append(1) or padded_pass(self, *args),
    )
    n = len(pair.prompt)
    sequences = [pair.prompt, continuation(pair, n + 10, seed=1), continuation(pair, n + 4, seed=2)]
    kv = pair.ours.new_kv_store()
    run(pair.ours, kv, [(i, 0, ids[:-3]) for i, ids in enumerate(sequences)])
    for back in (3, 2, 1):
        pieces = [(i, len(ids) - back, ids[len(ids) - back : len(ids) - back + 1]) for i, ids in enumerate(sequences)]
        for logits, ids in zip(run(pair.ours, kv, pieces), sequences, strict=True):
            position = len(ids) - back
            assert_logits_close(logits, reference_logits(pair.reference, ids[: position + 1])[-1:])
    assert [kv.length(i) for i in range(3)] == [len(ids) for ids in sequences]
    longest = [max(len(ids) - back for ids in sequences) + 1 for back in (3, 2, 1)]
    windows = [pair.config.window_of(layer) for layer in range(pair.config.n_layers)]
    unwindowed = sum(window is None or keys <= window for keys in longest for window in windows)
    assert len(passes) == (unwindowed if padded else 0)  # a layer whose window the caches passed goes one by one


@torch.inference_mode()
def test_split_model_equals_whole(pair: Pair) -> None:
    split = pair.config.n_layers // 2
    front, back = load_ours(pair.folder, end=split), load_ours(pair.folder, start=split)
    assert front.embed_tokens is not None and front.lm_head is None and front.n_layers == split
    assert back.embed_tokens is None and back.lm_head is not None and back.n_layers == pair.config.n_layers - split
    front_kv, back_kv, whole_kv = front.new_kv_store(), back.new_kv_store(), pair.ours.new_kv_store()

    ids = continuation(pair, len(pair.prompt) + 6)
    steps = [(0, len(pair.prompt))] + [(position, position + 1) for position in range(len(pair.prompt), len(ids))]
    for start, end in steps:
        batch = [SequenceSlice(0, start, end - start)]
        hidden = front.forward_layers(front.embed(ids[start:end]), batch, front_kv)
        split_logits = back.head(back.forward_layers(hidden, batch, back_kv))
        (whole_logits,) = run(pair.ours, whole_kv, [(0, start, ids[start:end])])
        assert_logits_close(split_logits, whole_logits, tolerance=1e-6)
    assert front_kv.length(0) == back_kv.length(0) == len(ids)


@pytest.mark.parametrize("kind", ["llama", "gemma3", "gemma2", "olmo2", "qwen2_moe", "qwen3_moe", "gemma3_vision"])
@torch.inference_mode()
def test_bfloat16_tracks_transformers(kind: str, tiny_model_factory) -> None:
    """In bfloat16 too: where a cast happens (Gemma's norms scale before casting, its embedding scale is rounded to
    bfloat16) shows here, not in float32."""
    folder = tiny_model_factory(kind)
    ours, reference = load_ours(folder, torch.bfloat16), load_reference(folder, torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    prompt = encode_prompt(folder)
    (logits,) = run(ours, ours.new_kv_store(), [(0, 0, prompt)])
    expected = reference_logits(reference, prompt)
    assert logits.dtype == torch.float32
    # Gemma 2's logits are capped under 1 here, where bfloat16's steps are ~0.004: transformers' own bfloat16 logits
    # are 0.024 from its float32 ones (ours 0.021), and from ours by as much.
    assert_logits_close(logits, expected, tolerance=3e-2 if kind == "gemma2" else 2e-2)

    n_tokens = 8
    generated = reference.generate(
        prompt[None],
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=n_tokens,
        min_new_tokens=n_tokens,
    )[0, len(prompt) :].tolist()
    kv, tokens = ours.new_kv_store(), list(prompt.tolist())
    (logits,) = run(ours, kv, [(0, 0, prompt)])
    for _ in range(n_tokens):
        last = logits[-1].clone()
        last[list(ours.config.eos_token_ids)] = float("-inf")
        tokens.append(int(last.argmax()))
        (logits,) = run(ours, kv, [(0, len(tokens) - 1, torch.tensor(tokens[-1:]))])
    assert tokens[len(prompt) :] == generated


@pytest.mark.parametrize(
    ("config_class", "fields", "left_out"),
    [
        ("MistralConfig", {"sliding_window": 8}, "sliding_window"),
        ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "sliding_window"),
        ("Qwen3Config", {"head_dim": 16}, "head_dim"),
        ("Qwen3Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "sliding_window"),
        ("LlamaConfig", {"head_dim": 24}, "head_dim"),
    ],
)
def test_a_field_left_out_of_config_json_takes_transformers_default(
    config_class: str, fields: dict[str, object], left_out: str
) -> None:
    """A config.json may leave out a field its family defaults: transformers' Mistral (and Qwen with
    use_sliding_window) then windows at 4096, and Qwen3's heads are 128 wide whatever the hidden size. Reading them
    as "no window" and hidden / heads attended past the window, or built heads of the wrong width."""
    sizes = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3}
    raw = getattr(transformers, config_class)(**sizes, **fields).to_dict()
    raw.pop(left_out)
    raw.pop("layer_types", None)  # as configs written before transformers 4.54 are: layers windowed by the rules
    reference = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    ours = ModelConfig.from_hf({**raw, "model_type": reference.model_type})
    width = getattr(reference, "head_dim", None) or reference.hidden_size // reference.num_attention_heads
    assert ours.head_dim == width
    kinds = getattr(reference, "layer_types", None) or ["sliding_attention"] * reference.num_hidden_layers
    window = getattr(reference, "sliding_window", None)
    expected = [window if kind == "sliding_attention" else None for kind in kinds]
    assert [ours.window_of(layer) for layer in range(ours.n_layers)] == expected
