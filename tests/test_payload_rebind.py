"""cgtree.payload.pack_encoded / unpack_encoded / rebind_weights: the pieces the client's graph
cache stores and binds graphs with."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cgtree.client.lowering import encode, lower
from cgtree.payload import (
    PayloadError,
    WeightBlob,
    pack_encoded,
    rebind_weights,
    tensor_to_weight_blob,
    unpack_encoded,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def encoded_mlp(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)).eval()
    return model, encode(lower(model, [torch.randn(2, 8)]))


def blobs_of(model) -> dict[int, WeightBlob]:
    return {i: tensor_to_weight_blob(p) for i, p in enumerate(model.parameters())}


def test_rebinding_other_weights_gives_the_bytes_a_fresh_encoding_gives():
    _, first = encoded_mlp(0)
    other_model, other = encoded_mlp(1)
    rebound = rebind_weights(first, blobs_of(other_model))
    assert rebound.graph_bytes == other.graph_bytes and rebound.graph_id == other.graph_id
    assert rebound.weight_hashes == other.weight_hashes and rebound.input_specs == other.input_specs
    assert {h: b.data for h, b in rebound.weights.items()} == {h: b.data for h, b in other.weights.items()}


def test_rebinding_the_same_weights_changes_nothing():
    model, encoded = encoded_mlp(0)
    assert rebind_weights(encoded, blobs_of(model)).graph_bytes == encoded.graph_bytes


def test_a_weight_of_another_shape_or_dtype_does_not_fit():
    _, encoded = encoded_mlp(0)
    with pytest.raises(PayloadError, match="does not fit"):
        rebind_weights(encoded, {0: tensor_to_weight_blob(torch.zeros(8, 9))})
    with pytest.raises(PayloadError, match="does not fit"):
        rebind_weights(encoded, {0: tensor_to_weight_blob(torch.zeros(8, 8, dtype=torch.float64))})
    with pytest.raises(PayloadError, match="out of range"):
        rebind_weights(encoded, {99: tensor_to_weight_blob(torch.zeros(1))})


def test_a_document_without_some_blobs_needs_them_rebound():
    model, encoded = encoded_mlp(0)
    data = pack_encoded(encoded, omit_weights=encoded.weight_hashes[:2])
    with pytest.raises(PayloadError, match="does not hold"):
        unpack_encoded(data)
    template = unpack_encoded(data, allow_missing_weights=True)
    assert set(template.weights) == set(encoded.weight_hashes[2:])
    with pytest.raises(PayloadError, match="has no blob"):
        rebind_weights(template, {})
    blobs = blobs_of(model)
    assert rebind_weights(template, {0: blobs[0], 1: blobs[1]}).graph_bytes == encoded.graph_bytes


def test_a_blob_that_does_not_match_its_hash_is_refused():
    _, encoded = encoded_mlp(0)
    data = pack_encoded(encoded)
    blob = next(iter(encoded.weights.values()))
    tampered = data.replace(blob.data[:16], bytes(16))
    with pytest.raises(PayloadError, match="does not match its data"):
        unpack_encoded(tampered)
