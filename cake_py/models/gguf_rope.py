"""YaRN rope scaling as llama.cpp stores it in a GGUF (`{arch}.rope.scaling.*`), translated to HF's rope_scaling.

llama.cpp's YaRN is transformers' with `truncate` on, and it multiplies cos and sin by 0.1 ln(factor) + 1 times
`yarn_attn_factor`; its `yarn_ext_factor` scales the ramp, and `yarn_log_multiplier` (DeepSeek's) and
`rope.scaling.attn_factor` (Phi-3's and gpt-oss's) change the attention scale in ways of their own. A file that sets
any of those to other than its neutral value is refused, naming the key, rather than computed otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cake_py.errors import UnsupportedArchitectureError

# Keys whose only values computed here are the neutral ones (None: absent), with what each is neutral at.
NEUTRAL_YARN_KEYS = {
    "rope.scaling.yarn_ext_factor": (-1.0, 1.0),  # -1: llama.cpp's "unset", which is 1 for YaRN
    "rope.scaling.yarn_attn_factor": (1.0,),
    "rope.scaling.yarn_log_multiplier": (0.0,),
    "rope.scaling.attn_factor": (1.0,),
}


def yarn_fields(value: Callable[..., Any], architecture: str) -> dict[str, Any]:
    """The rope_scaling fields of a YaRN GGUF beyond its factor and original context, from its metadata
    (`value(key, default)`, keys without the architecture's prefix)."""
    for key, neutral in NEUTRAL_YARN_KEYS.items():
        found = value(key)
        if found is not None and found not in neutral:
            raise UnsupportedArchitectureError(
                f"unsupported GGUF metadata {architecture}.{key} = {found!r} (YaRN is computed with "
                f"{' or '.join(str(n) for n in neutral)} there)"
            )
    fields = {"beta_fast": value("rope.scaling.yarn_beta_fast"), "beta_slow": value("rope.scaling.yarn_beta_slow")}
    return {key: found for key, found in fields.items() if found is not None}
