"""Fixtures for the compile-backend tests: a clean dynamo and cgtree backend around each test."""

from __future__ import annotations

import logging

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


@pytest.fixture
def log_lines(caplog):
    """``log_lines(logger)``: messages logged at WARNING or above by ``logger`` so far."""
    caplog.set_level(logging.INFO)

    def lines(logger: str, level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= level]

    return lines
