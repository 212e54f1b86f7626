"""Drawing one token: the sampler against the straightforward way (mask the whole vocabulary, sort, multinomial).

    .venv/bin/python benchmarks/sampling.py [--draws 300] [--threads 1]

Logits over SmolLM2's vocabulary size: the embedded model's own logits for a short chat prompt (real
distributions: a nucleus of a few tokens to a few hundred). Each setting is timed both ways in this run, median of
five batches of --draws: the sampler (`Sampler.sample`: top-k directly, top-p from a widening top-k, one
inverse-CDF draw) and the baseline it replaced (`filter_logits` over the whole vocabulary, softmax,
`torch.multinomial`), which computes the same distribution. Then llama.cpp's routes (`/completion` defaults: no
chain, the path above) against each of its other samplers turned on (models/llama_samplers.py: the chain), with a
history of 300 tokens for the penalties and DRY.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cake_py.cluster.pipeline import local_pipeline  # noqa: E402
from cake_py.models.hub import resolve_model  # noqa: E402
from cake_py.models.kv_cache import SequenceSlice  # noqa: E402
from cake_py.models.llama_samplers import LlamaSamplers  # noqa: E402
from cake_py.models.sampling import Sampler, SamplingParams, filter_logits  # noqa: E402

SETTINGS = {
    "/generate defaults (top-k 80, top-p 0.9, T 0.7)": SamplingParams(temperature=0.7, top_k=80, top_p=0.9),
    "OpenAI top-p 0.95, T 0.8": SamplingParams(temperature=0.8, top_p=0.95),
    "temperature 1.0 only": SamplingParams(temperature=1.0),
    "min-p 0.05, T 0.9": SamplingParams(temperature=0.9, min_p=0.05),
}

LLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "temperature_last": True}
LLAMA_SETTINGS = {
    "defaults (no chain)": LlamaSamplers(),
    "typical_p 0.9": LlamaSamplers(typical_p=0.9),
    "top_n_sigma 1.0": LlamaSamplers(top_n_sigma=1.0),
    "xtc 0.5 / 0.1": LlamaSamplers(xtc_probability=0.5, xtc_threshold=0.1),
    "dry 0.8 (whole history)": LlamaSamplers(dry_multiplier=0.8),
    "dynatemp_range 0.5": LlamaSamplers(dynatemp_range=0.5),
    "mirostat 2": LlamaSamplers(mirostat=2),
}


def model_logits() -> torch.Tensor:
    """(vocab,) float32 logits of the embedded model's next token after a chat prompt."""
    source = resolve_model(None)
    pipeline = local_pipeline(source, torch.bfloat16)
    ids = source.tokenizer.encode_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    with torch.inference_mode():
        logits = pipeline.logits(torch.tensor(ids), [SequenceSlice(1, 0, len(ids))], [len(ids) - 1])
    return logits[0]


def baseline(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    scaled = (logits - logits.max()) / params.temperature
    probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p, params.min_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def ms_per_draw(draw: object, draws: int) -> float:
    assert callable(draw)
    batches = []
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(draws):
            draw()
        batches.append((time.perf_counter() - began) / draws * 1000)
    return statistics.median(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logits = model_logits()
    print(f"logits of SmolLM2-135M over {logits.shape[0]} tokens, {args.threads} thread(s), ms per draw (median)")
    print(f"{'setting':50s} {'sampler':>9s} {'baseline':>9s} {'speedup':>8s}")
    for name, params in SETTINGS.items():
        sampler = Sampler(params)
        generator = torch.Generator().manual_seed(0)
        fast = ms_per_draw(lambda sampler=sampler: sampler.sample(logits, []), args.draws)
        slow = ms_per_draw(lambda p=params, g=generator: baseline(logits, p, g), args.draws)
        print(f"{name:50s} {fast:9.3f} {slow:9.3f} {slow / fast:7.1f}x")
    history = list(range(300))
    print(f"\nllama.cpp's samplers on /completion's defaults, ms per draw (median)\n{'setting':50s} {'sampler':>9s}")
    for name, llama in LLAMA_SETTINGS.items():
        sampler = Sampler(SamplingParams(**LLAMA_DEFAULTS, llama=llama))  # type: ignore[arg-type]
        print(f"{name:50s} {ms_per_draw(lambda s=sampler: s.sample(logits, history), args.draws):9.3f}")


if __name__ == "__main__":
    main()
