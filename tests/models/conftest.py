"""Fixtures for the real-model tests: a clean dynamo and cgtree backend around each test."""

from __future__ import annotations

import pytest
import torch

import cgtree.compile as cgtree_compile


@pytest.fixture(autouse=True)
def fresh_backend():
    torch._dynamo.reset()
    cgtree_compile.reset()
    yield
    torch._dynamo.reset()
    cgtree_compile.reset()
