"""Helpers of the real-model tests (``from model_helpers import ...``): the model zoo
(``benchmarks/real_models.py``) and counter readers for both tree paths."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

import cgtree.compile as cgtree_compile

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_zoo():
    """benchmarks/real_models.py by path (the repository root on sys.path would let the bare
    cgtree/ folder shadow the installed package)."""
    name = "_real_models_for_tests"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / "real_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


zoo = load_zoo()


def case_or_skip(name: str):
    case = zoo.CASES[name]
    missing = zoo.missing_library(case)
    if missing:
        pytest.skip(missing)
    return case


def in_process_counters() -> dict[str, int]:
    """backend="cgtree"'s counters, summed over its managers."""
    total: dict[str, int] = {}
    for manager in cgtree_compile.managers().values():
        for key, value in manager.counters.items():
            total[key] = total.get(key, 0) + value
    return total


def session_counters(client: Any) -> dict[str, int]:
    """The daemon's counters of this client's session, summed over its devices."""
    total: dict[str, int] = {}
    for session in client.status(session_only=True).get("sessions") or []:
        for device in (session.get("devices") or {}).values():
            counters = device.get("counters") or (device.get("tree") or {}).get("counters") or {}
            for key, value in counters.items():
                if isinstance(value, int):
                    total[key] = total.get(key, 0) + value
    return total


def grew(after: dict, before: dict, key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)
