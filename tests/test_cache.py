"""The shared model cache: one load per model and settings, LRU eviction under a budget, release."""
from __future__ import annotations

import pytest

from helpers import make_model_folder
from wallaroo_nodes.engine.cache import ModelCache, resolve_model
from wallaroo_nodes.engine.weights import WeightsError


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return [make_model_folder(tmp_path_factory.mktemp(f"m{i}"), seed=i) for i in range(2)]


def test_same_model_loads_once_whatever_the_spelling(folders):
    cache = ModelCache()
    a = cache.get(folders[0])
    b = cache.get(str(folders[0]), dtype="fp32", device="cpu")  # "auto" resolves to fp32 on cpu
    c = cache.get(folders[0] / "." , dtype="auto", device="auto", attention="auto")
    assert a is b is c
    assert cache.loads == 1
    assert len(cache.loaded()) == 1


def test_different_dtype_is_a_different_entry(folders):
    cache = ModelCache()
    a = cache.get(folders[0], dtype="fp32")
    b = cache.get(folders[0], dtype="bf16")
    assert a is not b and cache.loads == 2
    assert b.model.dtype.is_floating_point and str(b.model.dtype) == "torch.bfloat16"


def test_lru_evicts_beyond_budget_and_keeps_the_newest(folders):
    one = ModelCache().get(folders[0])
    size = sum(t.numel() * t.element_size() for t in one.model.state_dict().values())
    cache = ModelCache(budget_bytes=int(size * 1.5))  # room for one model only
    cache.get(folders[0])
    cache.get(folders[1])
    keys = cache.loaded()
    assert len(keys) == 1 and keys[0][0] == str(folders[1].resolve())
    assert cache.loaded_bytes() <= int(size * 1.5)
    cache.get(folders[0])  # evicted earlier, so loaded again
    assert cache.loads == 3


def test_release_unloads(folders):
    cache = ModelCache()
    cache.get(folders[0])
    cache.get(folders[1])
    assert cache.release(folders[0]) == 1
    assert [k[0] for k in cache.loaded()] == [str(folders[1].resolve())]
    assert cache.release() == 1 and cache.loaded() == []


def test_resolve_model_errors_name_the_fix(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        resolve_model(tmp_path / "empty")
