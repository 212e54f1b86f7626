"""Split GGUF models (llama.cpp's gguf-split): the first part loads the whole model, equal to the unsplit file, and
a later, missing, renamed or mismatched part is one clear error."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch

from cake_py.cluster.pipeline import local_pipeline
from cake_py.errors import ModelNotFoundError, WeightsError
from cake_py.models.gguf import GGUFWeights
from cake_py.models.hub import resolve_model
from cake_py.models.kv_cache import SequenceSlice
from cake_py.models.weights import load_transformer
from tests.fixtures.cluster import generate_tokens
from tests.fixtures.gguf_split import split_gguf
from tests.unit.models.test_gguf import _write_gguf

N_TENSORS = 30  # the tiny Llama: 3 layers of 9, the embedding, final norm and head


@pytest.fixture(scope="module")
def whole(tiny_model_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama as one Q8_0 GGUF (its q/k rows permuted as llama.cpp's converter stores them)."""
    path = tmp_path_factory.mktemp("whole") / "tiny.gguf"
    return _write_gguf(tiny_model_factory("llama"), path, lambda _: gguf.GGMLQuantizationType.Q8_0)


def _logits(weights: GGUFWeights, ids: list[int]) -> torch.Tensor:
    config = resolve_model(str(weights.path)).config
    model = load_transformer(
        weights, config, 0, config.n_layers, with_embedding=True, with_head=True, dtype=torch.float32
    )
    tokens = torch.tensor(ids)
    with torch.inference_mode():
        hidden = model.forward_layers(model.embed(tokens), [SequenceSlice(0, 0, len(ids))], model.new_kv_store())
        return model.head(hidden)


@pytest.mark.parametrize(
    ("max_tensors", "no_tensors_first", "counts"),
    [(10, False, [10, 10, 10]), (16, True, [0, 16, 14])],
    ids=["tensors-in-every-part", "metadata-only-first-part"],  # gguf-split's --no-tensor-first-split
)
def test_a_split_model_loads_from_its_first_part_as_the_whole_file(
    whole: Path, tmp_path: Path, max_tensors: int, no_tensors_first: bool, counts: list[int]
) -> None:
    parts = split_gguf(whole, tmp_path / "tiny.gguf", max_tensors, no_tensors_first=no_tensors_first)
    assert [part.name for part in parts] == [f"tiny-0000{n}-of-00003.gguf" for n in (1, 2, 3)]
    assert [len(gguf.GGUFReader(part).tensors) for part in parts] == counts
    ours, expected = GGUFWeights(parts[0]), GGUFWeights(whole)
    assert ours.config == expected.config and sorted(ours.names()) == sorted(expected.names())
    assert [ours.info(name) for name in sorted(ours.names())] == [expected.info(n) for n in sorted(expected.names())]
    assert ours.tokenizer_json() == expected.tokenizer_json()
    assert ours.tokenizer_config() == expected.tokenizer_config()
    ids = [1, 17, 42, 99, 5, 63]
    assert torch.equal(_logits(ours, ids), _logits(expected, ids))
    # The way `cake serve`, `cake run` and /models/load open it: greedy tokens equal the unsplit file's.
    split_source, whole_source = resolve_model(str(parts[0])), resolve_model(str(whole))
    assert split_source.model_id == whole_source.model_id == "tiny"  # not "tiny-00001-of-00003"
    prompt = whole_source.tokenizer.encode("The quick brown cake")
    assert split_source.tokenizer.encode("The quick brown cake") == prompt
    tokens = generate_tokens(local_pipeline(split_source, torch.float32), split_source.tokenizer, prompt, 16)
    assert tokens == generate_tokens(local_pipeline(whole_source, torch.float32), whole_source.tokenizer, prompt, 16)


def test_parts_linked_to_blobs_as_in_the_hf_cache_are_found_by_their_links_names(whole: Path, tmp_path: Path) -> None:
    """A Hub snapshot holds links named as the files, pointing to blobs named by their hash: the other parts are
    the links beside the first, not files beside its blob."""
    (tmp_path / "made").mkdir()
    parts = split_gguf(whole, tmp_path / "made" / "tiny.gguf", 12)
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "main"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for part in parts:
        blob = blobs / hashlib.sha256(part.read_bytes()).hexdigest()
        shutil.move(part, blob)
        (snapshot / part.name).symlink_to(blob)
    weights = GGUFWeights(snapshot / parts[0].name)
    assert sorted(weights.names()) == sorted(GGUFWeights(whole).names())


def test_a_later_part_is_refused_naming_the_first(whole: Path, tmp_path: Path) -> None:
    parts = split_gguf(whole, tmp_path / "tiny.gguf", 10)
    for number, part in enumerate(parts[1:], start=2):
        first = re.escape(repr(str(parts[0])))
        with pytest.raises(
            WeightsError, match=rf"is part {number} of 3 of a split model: pass its first part, {first}$"
        ):
            GGUFWeights(part)
    renamed = tmp_path / "second.gguf"
    parts[1].rename(renamed)  # named otherwise, its first part cannot be named but is described
    with pytest.raises(WeightsError, match="is part 2 of 3 of a split model: pass its first part, the one whose split"):
        GGUFWeights(renamed)


def test_a_missing_part_is_named(whole: Path, tmp_path: Path) -> None:
    parts = split_gguf(whole, tmp_path / "tiny.gguf", 10)
    parts[2].unlink()
    with pytest.raises(ModelNotFoundError, match="part 1 of a split model of 3 parts, and its part ") as info:
        GGUFWeights(parts[0])
    assert repr(str(parts[2])) in str(info.value) and "\n" not in str(info.value)
    parts[1].unlink()
    missing = re.escape(f"its parts {str(parts[1])!r}, {str(parts[2])!r} do not exist")
    with pytest.raises(ModelNotFoundError, match=missing):
        GGUFWeights(parts[0])


def test_a_renamed_first_part_is_refused_saying_how_the_others_are_found(whole: Path, tmp_path: Path) -> None:
    parts = split_gguf(whole, tmp_path / "tiny.gguf", 10)
    renamed = parts[0].rename(tmp_path / "tiny.gguf")
    with pytest.raises(WeightsError, match="its name does not end in '-00001-of-00003.gguf'"):
        GGUFWeights(renamed)


def test_parts_of_other_splits_are_refused(whole: Path, tmp_path: Path) -> None:
    """A part that is not the one its name says (copied over, from another split of the model) would load with
    tensors missing or twice."""
    (tmp_path / "three").mkdir()
    three = split_gguf(whole, tmp_path / "three" / "tiny.gguf", 10)
    shutil.copy(three[2], three[1])
    with pytest.raises(WeightsError, match=r"00002-of-00003.gguf' should be part 2 of 3 .* says it is part 3 of 3"):
        GGUFWeights(three[0])
    halves = {}
    for max_tensors in (15, 20):  # 15 + 15 and 20 + 10 tensors
        (folder := tmp_path / str(max_tensors)).mkdir()
        halves[max_tensors] = split_gguf(whole, folder / "tiny.gguf", max_tensors)
    shutil.copy(halves[20][1], halves[15][1])
    with pytest.raises(WeightsError, match=r"the 2 parts of the split model .* hold 25 tensors where its first .* 30"):
        GGUFWeights(halves[15][0])
    shutil.copy(split_gguf(whole, tmp_path / "15" / "other.gguf", 15)[1], halves[20][1])
    with pytest.raises(WeightsError, match=r"tensor 'blk\.\d\.\w+\.weight' is in both part 1 and part 2 of the split"):
        GGUFWeights(halves[20][0])
    shutil.copy(whole, three[1])
    with pytest.raises(WeightsError, match="should be part 2 of 3 .* but its metadata is not a part of a split model"):
        GGUFWeights(three[0])


def test_cake_run_on_a_later_part_is_one_line_naming_the_first(whole: Path, tmp_path: Path) -> None:
    parts = split_gguf(whole, tmp_path / "tiny.gguf", 10)
    result = subprocess.run(
        [sys.executable, "-m", "cake_py.cli", "run", str(parts[1]), "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(parts[0]) in lines[0], result.stderr


def test_4bit_weights_of_a_later_part_are_handed_over_as_stored(tiny_model_factory: Any, tmp_path: Path) -> None:
    """A Q4_0 model's layer weights run on the int4 kernel as stored (16-bit dtype on the CPU): from any part."""
    q4 = _write_gguf(tiny_model_factory("llama"), tmp_path / "q4.gguf", lambda _: gguf.GGMLQuantizationType.Q4_0)
    (tmp_path / "parts").mkdir()
    parts = split_gguf(q4, tmp_path / "parts" / "q4.gguf", 8)
    ours, expected = GGUFWeights(parts[0]), GGUFWeights(q4)
    assert len(parts) == 4 and ours.int4_names() == expected.int4_names() != set()
    for name in sorted(expected.int4_names()):
        assert all(torch.equal(a, b) for a, b in zip(ours.load_int4(name), expected.load_int4(name), strict=True))
