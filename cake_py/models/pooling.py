"""Embeddings from a language model: the final-norm hidden states of a prompt pooled into one vector.

`last` takes the prompt's last token (what decoder-only embedding models such as e5-mistral, gte-Qwen2 and
Qwen3-Embedding are trained for, and vLLM's default for them); `mean` averages every token. A model folder with a
sentence-transformers pooling config (`1_Pooling/config.json`) says which it was trained with.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from cake_py.config import POOLING_KINDS
from cake_py.errors import RequestError

log = logging.getLogger(__name__)

DEFAULT_POOLING = "last"
# sentence-transformers' pooling modes, as its 1_Pooling/config.json names them.
_SENTENCE_TRANSFORMERS_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean"}


@dataclass(frozen=True)
class Pooling:
    """How a prompt becomes one embedding: which rows, and whether the vector is scaled to unit length."""

    kind: str = DEFAULT_POOLING
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.kind not in POOLING_KINDS:
            raise RequestError(f"pooling {self.kind!r} is not one of {', '.join(POOLING_KINDS)}")

    def rows(self, start_pos: int, n_tokens: int, n_prompt: int) -> range:
        """The positions of a slice [start_pos, start_pos + n_tokens) whose hidden states this pooling reads."""
        end = min(start_pos + n_tokens, n_prompt)
        if self.kind == "mean":
            return range(start_pos, end)
        return range(n_prompt - 1, n_prompt) if end == n_prompt else range(0)


class PoolingState:
    """One prompt's pooling in progress: its slices may come in several steps (a long prompt's prefill chunks)."""

    def __init__(self, pooling: Pooling) -> None:
        self.pooling = pooling
        self.total: torch.Tensor | None = None  # (hidden,) float32: the sum of the rows seen (mean), or the last row
        self.count = 0

    def add(self, hidden: torch.Tensor) -> None:
        """(N, hidden) float32 rows of this prompt, in order."""
        if not len(hidden):
            return
        if self.pooling.kind == "mean":
            part = hidden.sum(0)
            self.total = part if self.total is None else self.total + part
        else:
            self.total = hidden[-1].clone()
        self.count += len(hidden)

    def result(self) -> bytes:
        """The embedding as little-endian float32 bytes (what the API layer turns into a list or base64)."""
        if self.total is None:
            raise RuntimeError("no hidden state was pooled")
        vector = self.total / self.count if self.pooling.kind == "mean" else self.total
        if self.pooling.normalize:
            vector = torch.nn.functional.normalize(vector, dim=0)
        # The head may sit on a GPU: the bytes are read on the CPU.
        return vector.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()


def folder_pooling(folder: Path) -> str | None:
    """The pooling a sentence-transformers model folder declares (`1_Pooling/config.json`) when this server runs it;
    None without one, or (with a warning) when it asks for another (cls, max …): then --pooling decides."""
    path = folder / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        log.warning("ignoring the unreadable pooling config %s: %s", path, error)
        return None
    if not isinstance(config, dict):
        log.warning("ignoring the pooling config %s: not a JSON object", path)
        return None
    for mode, kind in _SENTENCE_TRANSFORMERS_MODES.items():
        if config.get(mode) is True:
            return kind
    modes = sorted(key for key, value in config.items() if key.startswith("pooling_mode") and value is True)
    log.warning(
        "%s asks for pooling %s, which this server does not run; embeddings pool by --pooling (default %s)",
        path,
        ", ".join(modes) or "none",
        DEFAULT_POOLING,
    )
    return None
