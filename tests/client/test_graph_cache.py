"""cgtree.client.graph_cache: lowered nn.Modules kept on disk, keyed so that a changed model
never gets a stale graph.

A hit must give byte for byte the payload a fresh lowering gives (weights read from the live
module); anything the key covers must turn a hit into a miss; unreadable entries and unsafe
directories must fall back to lowering; modules the key cannot describe are not cached.
"""

from __future__ import annotations

import importlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from cgtree.client import graph_cache, lowering
from cgtree.client.graph_cache import GraphCache, lower_and_encode

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# Model code lives in a real file (the key hashes the files of the classes and of the code that
# runs during the trace); each test gets its own copy under a unique module name.
MODELS_SOURCE = '''
import torch
from torch import nn
import {helpers} as helpers

GLOBAL_TABLE = torch.arange(4.0)


class Block(nn.Module):
    def __init__(self, width=8, approximate="none"):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.GELU(approximate=approximate)
        self.register_buffer("shift", torch.linspace(-1, 1, width))
        self.scale = 0.5
        self.offset = torch.full((width,), 0.25)  # a plain tensor attribute: a lifted constant

    def forward(self, x):
        return helpers.squash(self.act(self.fc(x)) * self.scale + self.shift + self.offset)


class UsesGlobal(nn.Module):
    def forward(self, x):
        return x + GLOBAL_TABLE


class DropsProfiler(nn.Module):
    def forward(self, x):
        import sys
        sys.setprofile(None)
        return x + 1


class Counts(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return x + self.calls
'''
HELPERS_SOURCE = '''
import torch


def squash(x):
    return torch.tanh(x)
'''
HELPERS_CHANGED = '''
import torch


def squash(x):
    return torch.sigmoid(x)
'''


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A fresh module of model classes (file models_<id>.py, helpers in helpers_<id>.py)."""
    suffix = uuid.uuid4().hex[:8]
    helpers_name, models_name = f"helpers_{suffix}", f"models_{suffix}"
    (tmp_path / f"{helpers_name}.py").write_text(HELPERS_SOURCE)
    (tmp_path / f"{models_name}.py").write_text(MODELS_SOURCE.format(helpers=helpers_name))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(models_name)
    module.HELPERS_PATH = tmp_path / f"{helpers_name}.py"
    module.HELPERS_NAME = helpers_name
    yield module
    sys.modules.pop(models_name, None)
    sys.modules.pop(helpers_name, None)


@pytest.fixture
def cache(tmp_path):
    return GraphCache(tmp_path / "graphs")


def build(models, seed=0, **kwargs):
    torch.manual_seed(seed)
    return models.Block(**kwargs).eval()


def fresh(module, inputs):
    """What lowering gives without any cache."""
    return lowering.encode(lowering.lower(module, inputs))


def assert_same_payload(got, want):
    assert got.graph_id == want.graph_id and got.graph_bytes == want.graph_bytes
    assert got.weight_hashes == want.weight_hashes and got.input_specs == want.input_specs
    assert set(got.weights) == set(want.weights)
    for h, blob in want.weights.items():
        assert got.weights[h].data == blob.data


def record():
    return graph_cache.last_lowering()


def no_lowering(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("lowered although the cache should have hit")

    monkeypatch.setattr(lowering, "lower", refuse)


# ---------------------------------------------------------------------------------------------
# Miss, then hit


def test_a_miss_writes_an_entry_and_the_next_call_hits_without_lowering(models, cache, monkeypatch):
    module, x = build(models), torch.randn(4, 8)
    first = lower_and_encode(module, [x], cache=cache)
    assert (record().cache, record().route, record().detail) == ("miss", "make_fx", "no entry")
    assert_same_payload(first, fresh(module, [x]))
    entries = list(cache.directory.iterdir())
    assert [p.name for p in entries] == [f"{record().key}.cgtg"]
    assert stat.S_IMODE(cache.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(entries[0].stat().st_mode) == 0o600

    no_lowering(monkeypatch)
    second = lower_and_encode(module, [x], cache=cache)
    assert record().cache == "hit"
    assert_same_payload(second, first)


def test_entries_hold_no_parameter_or_buffer_data(models, cache):
    module, x = build(models), torch.randn(4, 8)
    lower_and_encode(module, [x], cache=cache)
    data = next(cache.directory.iterdir()).read_bytes()
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        assert tensor.detach().numpy().tobytes() not in data, name
    assert module.offset.numpy().tobytes() in data  # a constant the graph owns is kept


def test_new_weights_hit_and_are_bound_from_the_live_module(models, cache, monkeypatch):
    x = torch.randn(4, 8)
    lower_and_encode(build(models, seed=1), [x], cache=cache)
    retrained = build(models, seed=2)
    with torch.no_grad():
        retrained.shift.add_(1.0)
    want = fresh(retrained, [x])
    no_lowering(monkeypatch)
    got = lower_and_encode(retrained, [x], cache=cache)
    assert record().cache == "hit"
    assert_same_payload(got, want)


def test_a_fresh_process_hits_and_gets_the_same_graph(models, cache, tmp_path):
    x = torch.randn(4, 8)
    first = lower_and_encode(build(models), [x], cache=cache)
    script = tmp_path / "later.py"
    script.write_text(textwrap.dedent(f'''
        import json, sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        from {models.__name__} import Block
        from cgtree.client import graph_cache
        torch.manual_seed(0)
        module = Block().eval()
        encoded = graph_cache.lower_and_encode(module, [torch.randn(4, 8)], cache={str(cache.directory)!r})
        print(json.dumps({{"cache": graph_cache.last_lowering().cache, "graph": encoded.graph_id}}))
    '''))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"cache": "hit", "graph": first.graph_id}


# ---------------------------------------------------------------------------------------------
# What the key covers: each change is a miss, and the result is the fresh lowering's


CHANGES = {
    "attribute of a torch module": lambda m, x: (setattr(m.act, "approximate", "tanh"), x)[1],
    "plain attribute": lambda m, x: (setattr(m, "scale", 0.75), x)[1],
    "tensor attribute contents": lambda m, x: (m.offset.fill_(2.0), x)[1],
    "training flag": lambda m, x: (m.train(), x)[1],
    "input shape": lambda m, x: torch.randn(5, 8),
    "input dtype": lambda m, x: (m.double(), x.double())[1],
    "parameter shape": lambda m, x: (setattr(m, "fc", nn.Linear(8, 8, bias=False)), x)[1],
    "module structure": lambda m, x: (setattr(m, "act", nn.Sequential(nn.GELU(), nn.ReLU())), x)[1],
    "requires_grad": lambda m, x: (m.fc.weight.requires_grad_(False), x)[1],
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_the_key_covers_is_a_miss(models, cache, change):
    module, x = build(models), torch.randn(4, 8)
    lower_and_encode(module, [x], cache=cache)
    first_key = record().key
    x = CHANGES[change](module, x)
    got = lower_and_encode(module, [x], cache=cache)
    assert record().cache == "miss" and record().key != first_key
    assert_same_payload(got, fresh(module, [x]))


def test_other_versions_are_a_miss(models, cache, monkeypatch):
    module, x = build(models), torch.randn(4, 8)
    lower_and_encode(module, [x], cache=cache)
    versions = graph_cache._versions()
    monkeypatch.setattr(graph_cache, "_versions", lambda: [*versions[:2], "2.99.0", *versions[3:]])
    lower_and_encode(module, [x], cache=cache)
    assert record().cache == "miss"


def test_an_edited_helper_file_that_ran_during_the_trace_is_a_miss(models, cache):
    module, x = build(models), torch.randn(4, 8)
    lower_and_encode(module, [x], cache=cache)
    key = record().key
    models.HELPERS_PATH.write_text(HELPERS_CHANGED)
    importlib.reload(sys.modules[models.HELPERS_NAME])
    got = lower_and_encode(module, [x], cache=cache)
    # Same key (the helper is not part of the module tree), but the entry's recorded file changed.
    assert (record().cache, record().key) == ("miss", key)
    assert record().detail.startswith("source file changed") and models.HELPERS_NAME in record().detail
    assert_same_payload(got, fresh(module, [x]))
    assert lower_and_encode(module, [x], cache=cache) and record().cache == "hit"


def test_an_edited_class_file_is_another_key(models, cache):
    module, x = build(models), torch.randn(4, 8)
    lower_and_encode(module, [x], cache=cache)
    key = record().key
    path = Path(models.__file__)
    path.write_text(path.read_text() + "\n# edited\n")
    lower_and_encode(module, [x], cache=cache)
    assert record().cache == "miss" and record().key != key


# ---------------------------------------------------------------------------------------------
# Damaged entries and unsafe places


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong blob", "other key"])
def test_a_damaged_entry_is_a_miss_and_is_rewritten(models, cache, damage):
    module, x = build(models), torch.randn(4, 8)
    want = lower_and_encode(module, [x], cache=cache)
    path = cache.entry_path(record().key)
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00not msgpack")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "wrong blob":  # the constant's bytes changed: its hash no longer matches
        offset = module.offset.numpy().tobytes()
        assert offset in data
        path.write_bytes(data.replace(offset, torch.full((8,), 9.0).numpy().tobytes()))
    else:  # a valid entry of another module under this key's name
        other, other_x = build(models, approximate="tanh"), torch.randn(4, 8)
        lower_and_encode(other, [other_x], cache=cache)
        path.write_bytes(cache.entry_path(record().key).read_bytes())
    got = lower_and_encode(module, [x], cache=cache)
    assert record().cache == "miss", record()
    assert_same_payload(got, want)
    lower_and_encode(module, [x], cache=cache)
    assert record().cache == "hit"


def test_a_symlinked_entry_is_not_followed(models, cache, tmp_path):
    module, x = build(models), torch.randn(4, 8)
    lower_and_encode(module, [x], cache=cache)
    path = cache.entry_path(record().key)
    target = tmp_path / "elsewhere.cgtg"
    path.rename(target)
    path.symlink_to(target)
    lower_and_encode(module, [x], cache=cache)
    assert record().cache == "miss"
    assert not path.is_symlink()  # replaced by a regular file


def test_a_group_writable_directory_is_not_used(models, tmp_path):
    directory = tmp_path / "shared"
    directory.mkdir(mode=0o777)
    os.chmod(directory, 0o777)
    module, x = build(models), torch.randn(4, 8)
    got = lower_and_encode(module, [x], cache=GraphCache(directory))
    assert record().cache == "unusable" and "writable by group or others" in record().detail
    assert_same_payload(got, fresh(module, [x]))
    assert list(directory.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# What is not cached


def test_a_module_with_a_forward_hook_is_not_cached(models, cache):
    module, x = build(models), torch.randn(4, 8)
    module.fc.register_forward_hook(lambda mod, args, out: out * 2)
    got = lower_and_encode(module, [x], cache=cache)
    assert record().cache == "uncacheable" and "forward hooks" in record().detail
    assert_same_payload(got, fresh(module, [x]))
    assert not cache.directory.exists() or list(cache.directory.iterdir()) == []


def test_a_tensor_captured_from_a_global_is_not_cached(models, cache):
    module, x = models.UsesGlobal(), torch.randn(4)
    lower_and_encode(module, [x], cache=cache)
    assert record().cache == "uncacheable" and "neither a module attribute" in record().detail
    assert list(cache.directory.iterdir()) == []


def test_code_without_a_source_file_in_forward_is_not_cached(models, cache):
    namespace: dict = {}
    exec("def forward(self, x):\n    return x * 3\n", namespace)  # noqa: S102 - the point of the test
    module = type("Generated", (nn.Module,), {"forward": namespace["forward"], "__module__": models.__name__})()
    lower_and_encode(module, [torch.randn(3)], cache=cache)
    assert record().cache == "uncacheable" and "no source file" in record().detail


def test_a_trace_that_removes_the_profile_hook_is_not_cached(models, cache):
    lower_and_encode(models.DropsProfiler(), [torch.randn(3)], cache=cache)
    assert record().cache == "uncacheable" and "profile hook" in record().detail


def test_modules_lowered_by_export_are_not_cached(models, cache, monkeypatch):
    def fail(*args, **kwargs):
        raise lowering._TraceFailed("make_fx failed: simulated")

    monkeypatch.setattr(lowering, "_lower_traced", fail)
    module, x = build(models), torch.randn(4, 8)
    lower_and_encode(module, [x], cache=cache)
    assert (record().cache, record().route) == ("uncacheable", "export")
    assert list(cache.directory.iterdir()) == []


def test_a_module_that_mutates_a_buffer_is_still_rejected(models, cache):
    module = models.Counts()
    with pytest.raises(lowering.LoweringError, match="calls"):
        lower_and_encode(module, [torch.randn(3)], cache=cache)
    assert float(module.calls) == 0.0
    assert not cache.directory.exists() or list(cache.directory.iterdir()) == []


def test_callables_and_graph_modules_bypass_the_cache(cache):
    lower_and_encode(lambda x: x + 1, [torch.randn(2)], cache=cache)
    assert record().cache == "off"
    lower_and_encode(torch.fx.symbolic_trace(nn.Linear(2, 2)), [torch.randn(1, 2)], cache=cache)
    assert record().cache == "off"
    assert not cache.directory.exists()


# ---------------------------------------------------------------------------------------------
# Which cache


def test_the_environment_variable_enables_the_cache_and_disable_wins(models, tmp_path, monkeypatch):
    module, x = build(models), torch.randn(4, 8)
    monkeypatch.setattr(graph_cache, "_configured", graph_cache._UNSET)
    monkeypatch.delenv(graph_cache.ENV_VAR, raising=False)
    lower_and_encode(module, [x])
    assert record().cache == "off"
    monkeypatch.setenv(graph_cache.ENV_VAR, str(tmp_path / "from-env"))
    lower_and_encode(module, [x])
    assert record().cache == "miss" and (tmp_path / "from-env").is_dir()
    graph_cache.disable()
    lower_and_encode(module, [x])
    assert record().cache == "off"
    enabled = graph_cache.enable(tmp_path / "enabled")
    assert graph_cache.active() is enabled
    lower_and_encode(module, [x])
    assert record().cache == "miss" and (tmp_path / "enabled").is_dir()
