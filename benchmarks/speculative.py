"""Prompt lookup decoding: decode ms/token with `--speculative-tokens K` drafts vs none, on text that repeats its
prompt (a revision of a given paragraph) and on text that does not (a story); and the story again with a predicted
output (OpenAI's `prediction`: here its own earlier answer as text, as a client regenerating it would send).

    .venv/bin/python benchmarks/speculative.py [--tokens 96] [--runs 3] [--threads 2] [--drafts 6]

SmolLM2-135M (the embedded Q4_1 GGUF), bf16, greedy, the model's chat template. One engine (two would share the
cores' OpenMP pools and slow each other), drafting or not by turns: each round sends the same request both ways,
alternating which goes first. Decode time is from a request's first token to its last, per token after the first
(prefill excluded), the median of --runs after a warm-up round. Greedy output is the same either way (checked: a
warning says when 16-bit rounding of a several-token step changed it); the table says how many drafted tokens the
model confirmed.
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cake_py.cluster.pipeline import local_pipeline  # noqa: E402
from cake_py.engine.engine import Engine  # noqa: E402
from cake_py.engine.sequence import GenerationEvent  # noqa: E402
from cake_py.models.device import release_openmp_threads  # noqa: E402
from cake_py.models.hub import resolve_model  # noqa: E402
from cake_py.models.sampling import SamplingParams  # noqa: E402

PARAGRAPH = (
    "The cluster splits the model's layers across three machines. Each worker holds a contigous range of layers and "
    "their key value caches, and the master keeps the embeddings, the final norm and the head. When a request "
    "arrives, the master embeds the prompt, sends the hidden states to the first worker, which passes its output to "
    "the next, and the last one answers the master, which samples the next token and streams it to the client."
)
TASKS = {
    "revision": f"Fix the spelling in this text and write it out again in full:\n\n{PARAGRAPH}",
    "story": "Write a short story about a dragon who learns to bake bread.",
}


def decode(engine: Engine, ids: list[int], tokens: int, prediction: tuple[int, ...] = ()) -> tuple[list[int], float]:
    """The greedy answer's token ids, and its decode seconds per token after the first."""
    events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
    engine.submit(ids, SamplingParams(temperature=0.0, max_tokens=tokens, prediction=prediction), events.put)
    out: list[int] = []
    first = last = 0.0
    while True:
        event = events.get()
        if event.error:
            raise SystemExit(event.error)
        if event.tokens:
            last = time.perf_counter()
            first = first or last
            out += [token.token_id for token in event.tokens]
        if event.finished:
            return out, (last - first) / max(len(out) - 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--drafts", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = resolve_model(None)
    engine = Engine(local_pipeline(source, torch.bfloat16), source.tokenizer)
    release_openmp_threads()  # loading ran on this thread; the engine thread must own its OpenMP pool
    engine.start()
    prompts = {name: source.tokenizer.encode_chat([{"role": "user", "content": text}]) for name, text in TASKS.items()}
    settings = (0, args.drafts)
    times: dict[tuple[str, int], list[float]] = {(name, d): [] for name in TASKS for d in settings}
    times["story, predicted", 8] = []
    drafted: dict[str, tuple[int, int, int]] = {}
    try:
        for run in range(args.runs + 1):
            for name, ids in prompts.items():
                outputs = {}
                for drafts in settings if run % 2 else reversed(settings):
                    engine.speculative_tokens = drafts  # read by the engine thread at its next step
                    stats = engine.stats
                    before = (stats.draft_tokens, stats.accepted_draft_tokens, stats.steps)
                    outputs[drafts], seconds = decode(engine, ids, args.tokens)
                    if run:  # the first round warms up
                        times[name, drafts].append(seconds * 1000)
                        if drafts:
                            proposed, accepted, steps = (
                                after - earlier
                                for after, earlier in zip(
                                    (stats.draft_tokens, stats.accepted_draft_tokens, stats.steps), before, strict=True
                                )
                            )
                            drafted[name] = (proposed, accepted, steps)
                if outputs[0] != outputs[args.drafts]:
                    print(f"warning: {name}: the outputs differ (16-bit rounding of a batched step)", file=sys.stderr)
                if name == "story":  # once more, predicted: its answer as text, re-encoded as a client's would be
                    engine.speculative_tokens = 0  # a prediction drafts on its own (8 tokens a step)
                    text = source.tokenizer.decode(outputs[0])
                    prediction = tuple(source.tokenizer.encode(text, add_special_tokens=False))
                    predicted, seconds = decode(engine, ids, args.tokens, prediction)
                    if run:
                        times["story, predicted", 8].append(seconds * 1000)
                    if predicted != outputs[0]:
                        print("warning: story, predicted: the output differs (16-bit rounding)", file=sys.stderr)
    finally:
        engine.stop()
    print(f"SmolLM2-135M Q4_1 (bf16, int4 kernels), {args.threads} threads, greedy, up to {args.tokens} tokens, "
          f"median of {args.runs}")  # fmt: skip
    print(f"| task | no drafts ms/token | {args.drafts} drafts ms/token | speedup | drafted / confirmed (last run) |")
    print("|---|---|---|---|---|")
    for name in TASKS:
        plain = statistics.median(times[name, 0])
        drafting = statistics.median(times[name, args.drafts])
        proposed, accepted, steps = drafted.get(name, (0, 0, 0))
        print(
            f"| {name} | {plain:.2f} | {drafting:.2f} | {plain / drafting:.2f}x | "
            f"{proposed} / {accepted} in {steps} steps |"
        )
    predicted = statistics.median(times["story, predicted", 8])
    plain = statistics.median(times["story", 0])
    print(f"| story, its earlier answer as `prediction` (8 drafts) | {plain:.2f} | {predicted:.2f} | "
          f"{plain / predicted:.2f}x | |")  # fmt: skip


if __name__ == "__main__":
    main()
