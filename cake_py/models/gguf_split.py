"""Split GGUF models (llama.cpp's `gguf-split`): the parts of `<prefix>-00001-of-0000N.gguf`, found and checked as
llama.cpp finds and checks them.

Every part holds `split.no` (0-based), `split.count` and `split.tensors.count`; the first part also holds the model's
metadata (and maybe tensors), the others only tensors. llama.cpp loads such a model from its first part and finds
the others by name (`llama_split_path`: `%s-%05d-of-%05d.gguf`), so this does too. Each part keeps its own
memory-mapped reader: a tensor is read from the part that holds it, nothing is copied or merged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf

from cake_py.errors import ModelNotFoundError, WeightsError

SPLIT_NO = "split.no"
SPLIT_COUNT = "split.count"
SPLIT_TENSORS = "split.tensors.count"
SHOWN_PARTS = 3  # missing parts named in an error; the rest are counted


def _value(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _number(reader: gguf.GGUFReader, key: str, path: Path) -> int | None:
    """A split key's value (None when absent); WeightsError naming the file and the key when it is not a whole
    number (gguf-split writes them as integers: anything else is a damaged or hand-made header)."""
    value = _value(reader, key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise WeightsError(f"GGUF file {str(path)!r}: metadata {key} must be a whole number, got {value!r}"[:300])
    return value


def _tail(number: int, count: int, suffix: str) -> str:
    """The end of part `number`'s (1-based) name: `-00002-of-00003.gguf`."""
    return f"-{number:05d}-of-{count:05d}{suffix}"


def part_path(path: Path, number: int, count: int, new_number: int) -> Path | None:
    """The sibling `new_number` of the part at `path` (part `number` of `count`), by llama.cpp's naming; None when
    `path`'s name does not follow it (a renamed part: its siblings cannot be found)."""
    tail = _tail(number, count, path.suffix)
    if not path.name.endswith(tail) or len(path.name) == len(tail):
        return None
    # Not resolved: a part in the HF cache is a link to a blob named by its hash, its siblings are links beside it.
    return path.with_name(path.name[: -len(tail)] + _tail(new_number, count, path.suffix))


def model_name(path: Path, n_parts: int) -> str:
    """The model's name from its (first) file's: a split model's without its part's tail (`Qwen2.5-72B-Q4_K_M`, not
    `Qwen2.5-72B-Q4_K_M-00001-of-00012`)."""
    tail = _tail(1, n_parts, path.suffix)
    return path.name[: -len(tail)] if n_parts > 1 and path.name.endswith(tail) else path.stem


def split_parts(
    path: Path, first: gguf.GGUFReader, open_part: Callable[[Path], gguf.GGUFReader]
) -> list[gguf.GGUFReader]:
    """The readers of every part of the model whose first part is `first` (read from `path`), in order; `[first]`
    for a file that is not split. `open_part` reads one more part (its own checks naming its path)."""
    count = _number(first, SPLIT_COUNT, path) or 1
    if count <= 1:
        return [first]
    number = (_number(first, SPLIT_NO, path) or 0) + 1
    if number != 1:
        first_path = part_path(path, number, count, 1)
        where = f"{str(first_path)!r}" if first_path is not None else f"the one whose {SPLIT_NO} is 0"
        raise WeightsError(
            f"GGUF file {str(path)!r} is part {number} of {count} of a split model: pass its first part, {where}"
        )
    paths = [part_path(path, 1, count, n) for n in range(2, count + 1)]
    if not all(paths):
        raise WeightsError(
            f"GGUF file {str(path)!r} is part 1 of {count} of a split model, but its name does not end in "
            f"{_tail(1, count, '.gguf')!r}, by which llama.cpp (and cake) find the other parts: give it its first "
            "part's name back"
        )
    others = [p for p in paths if p is not None]
    if missing := [str(p) for p in others if not p.is_file()]:
        # The first few by name: a header claiming 65535 parts made a line of megabytes.
        named = ", ".join(map(repr, missing[:SHOWN_PARTS]))
        if len(missing) > SHOWN_PARTS:
            named += f" and {len(missing) - SHOWN_PARTS} more"
        raise ModelNotFoundError(
            f"GGUF file {str(path)!r} is part 1 of a split model of {count} parts, and "
            f"{'its part ' if len(missing) == 1 else 'its parts '}{named} "
            f"{'does' if len(missing) == 1 else 'do'} not exist: download every part into the same folder"
        )
    readers = [first]
    for number, part in enumerate(others, start=2):
        reader = open_part(part)
        says_no, says_count = _number(reader, SPLIT_NO, part), _number(reader, SPLIT_COUNT, part)
        if (says_no, says_count) != (number - 1, count):
            told = (
                "is not a part of a split model"
                if says_no is None or says_count is None
                else f"says it is part {says_no + 1} of {says_count}"
            )
            raise WeightsError(
                f"GGUF file {str(part)!r} should be part {number} of {count} of the split model {str(path)!r}, "
                f"but its metadata {told}"
            )
        readers.append(reader)
    _check_tensors(path, count, readers)
    return readers


def _check_tensors(path: Path, count: int, readers: list[gguf.GGUFReader]) -> None:
    """Every tensor once, as many as the first part says (llama.cpp's checks: a part from another split of the same
    model, or one cut short of its tensors, would load with tensors missing or twice)."""
    seen: dict[str, int] = {}
    for number, reader in enumerate(readers, start=1):
        for tensor in reader.tensors:
            if tensor.name in seen:
                raise WeightsError(
                    f"tensor {tensor.name!r} is in both part {seen[tensor.name]} and part {number} of the split "
                    f"model {str(path)!r}"
                )
            seen[tensor.name] = number
    expected = _number(readers[0], SPLIT_TENSORS, path)
    if expected is not None and int(expected) != len(seen):
        raise WeightsError(
            f"the {count} parts of the split model {str(path)!r} hold {len(seen)} tensors where its first part "
            f"says {int(expected)} (a part from another split of the model?)"
        )
