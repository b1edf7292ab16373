"""cgtree.payload: the graph codec against hand-crafted, hostile and garbage payloads."""

from __future__ import annotations

import ast
import builtins
import math
import operator
import pickle
import random
import struct
import time

import msgpack
import pytest
import torch

from cgtree import payload
from cgtree.payload import (
    DecodedGraph,
    InputSpec,
    PayloadError,
    WeightBlob,
    decode_graph,
    encode_graph,
    pack_weight_blob,
    tensor_to_weight_blob,
    unpack_weight_blob,
    weight_hash,
    weight_to_tensor,
)
from cgtree.payload.decode import _GraphDecoder

HOSTILE_STRING = "__import__('os').system('touch /tmp/cgtree-pwned')"
A_HASH = "ab" * 32


def ref(index: int) -> dict:
    return {"ref": index}


def call(target: str, args: list, kwargs: dict | None = None) -> list:
    return ["call_function", target, args, kwargs or {}]


def document(nodes: list, outputs: list, **overrides) -> dict:
    """A graph document with one float32 [2, 3] cpu input (node 0) unless overridden."""
    doc = {
        "format": "cgtree.graph",
        "version": 1,
        "weights": [],
        "inputs": [[[2, 3], "float32", "cpu"]],
        "dynamic": False,
        "nodes": nodes,
        "outputs": outputs,
    }
    doc.update(overrides)
    return doc


def pack(doc: dict) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


ADD_ONE = pack(document([call("aten::add.Tensor", [ref(0), 1])], [1]))


def weighted_document() -> dict:
    """out = x @ w + 1 with one weight w: float32 [3, 4] (node 0) and input x (node 1)."""
    return document(
        [call("aten::mm.default", [ref(1), ref(0)]), call("aten::add.Tensor", [ref(2), 1])],
        [3],
        weights=[[A_HASH, "float32", [3, 4]]],
    )


# ---------------------------------------------------------------------------------------------
# Valid payloads


def test_minimal_graph_decodes_and_runs():
    decoded = decode_graph(ADD_ONE)
    assert isinstance(decoded, DecodedGraph)
    assert isinstance(decoded.module, torch.fx.GraphModule)
    x = torch.randn(2, 3)
    (out,) = decoded.module(x)
    torch.testing.assert_close(out, x + 1)
    assert decoded.num_outputs == 1
    assert decoded.input_specs == (InputSpec((2, 3), "float32", "cpu"),)
    assert decoded.dynamic is False and decoded.mutated_inputs == () and decoded.weight_hashes == ()


def test_bytearray_and_memoryview_payloads_decode():
    assert decode_graph(bytearray(ADD_ONE)).graph_id == decode_graph(memoryview(ADD_ONE)).graph_id


def test_input_spec_accepts_matching_tensors_only():
    spec = InputSpec((None, 3), "float32", "cpu")
    assert spec.accepts(torch.zeros(7, 3))
    assert not spec.accepts(torch.zeros(7, 4))
    assert not spec.accepts(torch.zeros(7, 3, dtype=torch.float64))
    assert not spec.accepts(torch.zeros(3))
    assert not spec.accepts(torch.zeros(7, 3, device="meta"))


def test_graph_id_is_the_sha256_of_the_graph_bytes():
    import hashlib

    assert decode_graph(ADD_ONE).graph_id == hashlib.sha256(ADD_ONE).hexdigest()


def test_weights_lead_the_placeholders():
    decoded = decode_graph(pack(weighted_document()))
    assert decoded.weight_hashes == (A_HASH,)
    assert decoded.weight_specs[0].shape == (3, 4)
    w, x = torch.randn(3, 4), torch.randn(2, 3)
    torch.testing.assert_close(decoded.module(w, x)[0], x @ w + 1)


def test_every_argument_kind_round_trips_through_the_decoder():
    nodes = [
        call("aten::full.default", [[2, 3], float("inf")],
             {"dtype": {"dtype": "bfloat16"}, "layout": {"layout": "strided"},
              "device": {"device": ["cpu", None]}, "pin_memory": False}),
        call("aten::clone.default", [ref(0)], {"memory_format": {"memory_format": "contiguous_format"}}),
        call("aten::mul.Scalar", [ref(0), {"complex": [1.0, 0.0]}]),
        call("aten::native_layer_norm.default", [ref(0), {"tuple": [3]}, None, None, 1e-5]),
        call("operator::getitem", [ref(4), 0]),
        call("aten::gelu.default", [ref(0)], {"approximate": "tanh"}),
        call("aten::full.default", [[1], float("nan")]),
    ]
    decoded = decode_graph(pack(document(nodes, [1, 2, 3, 5, 6, 7])))
    outs = decoded.module(torch.randn(2, 3))
    assert outs[0].dtype == torch.bfloat16 and math.isinf(outs[0][0, 0].item())
    assert math.isnan(outs[5].item())


def test_symbolic_int_arithmetic_is_allowed_and_checked():
    nodes = [
        call("aten::sym_size.int", [ref(0), 0]),
        call("operator::mul", [ref(1), 3]),
        call("aten::full.default", [[ref(2)], 1.0]),
    ]
    decoded = decode_graph(pack(document(nodes, [3], inputs=[[[None, 3], "float32", "cpu"]], dynamic=True)))
    assert decoded.dynamic and decoded.input_specs[0].shape == (None, 3)
    assert decoded.module(torch.randn(5, 3))[0].shape == (15,)
    with pytest.raises(OverflowError):
        payload.sym_mul(2**62, 4)  # int64 bound: no unbounded Python integers in the daemon


def test_device_constants_can_be_retargeted():
    nodes = [call("aten::full.default", [[2], 1.0], {"device": {"device": ["cuda", 3]}})]
    decoded = decode_graph(pack(document(nodes, [1])), device="cpu")
    assert decoded.module(torch.randn(2, 3))[0].device.type == "cpu"


def test_reencoding_a_decoded_graph_gives_the_same_bytes():
    data = pack(weighted_document())
    decoded = decode_graph(data)
    again = encode_graph(decoded.module, [torch.zeros(3, 4)], decoded.input_specs).graph_bytes
    # only the weight hash differs (the zeros are another weight)
    assert again.replace(weight_hash("float32", (3, 4), bytes(48)).encode(), A_HASH.encode()) == data


# ---------------------------------------------------------------------------------------------
# Operators: allow-list and refusals


@pytest.mark.parametrize(
    "target",
    [
        "builtins::eval.default",
        "os::system.default",
        "torch::load.default",
        "builtins.eval",
        "eval",
        "os.system",
        "torch.load",
        "subprocess::run.default",
        "cgtree_test::myop.default",
        "operator::setitem",
        "operator::pow",
        "operator::call",
        "operator::attrgetter",
        "operator::__class__",
        "aten::add.Tensor;import os",
        "aten::add.Tensor.x",
        "aten::add",
        "aten::__class__.default",
        "aten::name.default",
        "aten::_dir.default",
        "aten::add.__class__",
        "aten::add._schema",
        "aten::ädd.Tensor",
        "aten::no_such_op.default",
        "aten::add.no_such_overload",
        "aten::from_file.default",
        "aten::set_.source_Tensor",
        "aten::_print.default",
        "aten::manual_seed.default",
        "aten::ljust.default",
        "aten::mul.left_t",
        "higher_order::cond.default",
    ],
)
def test_disallowed_or_unknown_targets_are_rejected_naming_them(target):
    data = pack(document([call(target, [ref(0)])], [1]))
    with pytest.raises(PayloadError) as info:
        decode_graph(data)
    assert target[:40] in str(info.value)


def test_extra_namespace_must_be_allowed_explicitly():
    data = pack(document([call("cgtree_unregistered::myop.default", [ref(0)])], [1]))
    with pytest.raises(PayloadError, match="not allowed"):
        decode_graph(data)
    with pytest.raises(PayloadError, match="unknown operator"):  # allowed, but never registered
        decode_graph(data, allowed_namespaces=["cgtree_unregistered"])


@pytest.mark.parametrize("bad", ["operator", "os.path", "", "__builtins__", 3, "a b"])
def test_bad_allowed_namespaces_are_a_caller_error(bad):
    with pytest.raises(ValueError):
        decode_graph(ADD_ONE, allowed_namespaces=[bad])


# ---------------------------------------------------------------------------------------------
# Hostile content: nothing is evaluated or unpickled


def test_pickle_blob_where_a_constant_should_be_is_rejected():
    blob = pickle.dumps(print)
    data = pack(document([call("aten::add.Tensor", [ref(0), blob])], [1]))
    with pytest.raises(PayloadError, match="binary data"):
        decode_graph(data)


def test_code_like_string_where_a_tensor_is_expected_is_rejected():
    data = pack(document([call("aten::add.Tensor", [ref(0), HOSTILE_STRING])], [1]))
    with pytest.raises(PayloadError, match="argument 'other'"):
        decode_graph(data)


def test_code_like_string_where_a_string_is_expected_stays_a_constant():
    data = pack(document([call("aten::gelu.default", [ref(0)], {"approximate": HOSTILE_STRING})], [1]))
    decoded = decode_graph(data)
    gelu = next(n for n in decoded.module.graph.nodes if n.op == "call_function")
    assert gelu.kwargs["approximate"] == HOSTILE_STRING
    with pytest.raises(RuntimeError, match="approximate"):
        decoded.module(torch.randn(2, 3))  # the op refuses the value; nothing ran it as code


def _hostile_payloads() -> list[bytes]:
    hostile_nodes = [
        call("aten::add.Tensor", [ref(0), pickle.dumps(print)]),
        call("aten::add.Tensor", [ref(0), HOSTILE_STRING]),
        call("builtins::eval.default", [HOSTILE_STRING]),
        call("operator::getitem", [HOSTILE_STRING, 0]),
        ["call_module", "os.system", [HOSTILE_STRING], {}],
    ]
    payloads = [pack(document([node], [1])) for node in hostile_nodes]
    payloads.append(pack(document([], [0], inputs=[[[HOSTILE_STRING], "float32", "cpu"]])))
    payloads.append(pack(document([], [0], inputs=[[[2], HOSTILE_STRING, "cpu"]])))
    payloads.append(msgpack.packb(msgpack.ExtType(1, pickle.dumps(print))))
    return payloads


def test_decoding_never_unpickles_or_evaluates(monkeypatch):
    import sympy

    touched = []

    def forbidden(name):
        def trap(*args, **kwargs):
            touched.append(name)
            raise AssertionError(f"{name} called during decode")

        return trap

    for module, name in [
        (pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (builtins, "eval"),
        (torch, "load"), (torch.export, "load"), (sympy, "sympify"),
    ]:
        monkeypatch.setattr(module, name, forbidden(f"{module.__name__}.{name}"))
    # torch.fx compiles the Python source it generates for every GraphModule; record each use.
    real_exec = builtins.exec
    compiled = []

    def recording_exec(code, globals_=None, *args):
        compiled.append((code, dict(globals_ or {})))
        return real_exec(code, globals_, *args)

    monkeypatch.setattr(builtins, "exec", recording_exec)

    for data in _hostile_payloads():
        with pytest.raises(PayloadError):
            decode_graph(data)
    decoded = decode_graph(pack(document(
        [call("aten::gelu.default", [ref(0)], {"approximate": HOSTILE_STRING}),
         call("aten::sym_size.int", [ref(0), 0]),
         call("operator::mul", [ref(2), 2]),
         call("aten::full.default", [[ref(3)], float("-inf")], {"device": {"device": ["cpu", None]}})],
        [1, 4],
    )))
    monkeypatch.undo()

    assert touched == []
    # Only fx's own generated forward was compiled, and only for the graph that decoded.
    assert len(compiled) == 1
    code, globals_ = compiled[0]
    assert code.co_filename.startswith("<eval_with_key>")
    audit_generated_source(decoded.module.code, globals_, strings={HOSTILE_STRING, "cpu"})


def audit_generated_source(source: str, globals_: dict, strings: set[str]) -> None:
    """fx's source for a decoded graph calls only torch.ops.<aten|prims> and the payload's own
    functions; client strings appear only as literal constants."""
    allowed_callables = {f.call for f in payload.OPERATOR_FUNCTIONS.values()} | {torch.device}
    allowed_values = allowed_callables | {torch, torch.fx._pytree, torch.utils._pytree, type(None)}
    for name, value in globals_.items():
        if name == "__builtins__":
            continue
        is_float_constant = isinstance(value, float) and (math.isinf(value) or math.isnan(value))
        assert is_float_constant or value in allowed_values, (name, value)

    tree = ast.parse(source)
    function = tree.body[0]
    local_names = {a.arg for a in function.args.args} | {
        t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)
    }
    for node in ast.walk(tree):
        assert not isinstance(node, (ast.Import, ast.ImportFrom, ast.Lambda)), ast.dump(node)
        if isinstance(node, ast.Name):
            assert node.id in local_names or node.id in globals_ or node.id == "None", node.id
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                assert globals_.get(func.id) in allowed_callables, func.id
            else:
                chain = []
                while isinstance(func, ast.Attribute):
                    chain.append(func.attr)
                    func = func.value
                assert isinstance(func, ast.Name) and func.id == "torch", ast.dump(node.func)
                assert chain[-1] == "ops" and chain[-2] in ("aten", "prims"), chain
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert node.value in strings, node.value


# ---------------------------------------------------------------------------------------------
# Structural errors


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.update(version=2), "unsupported version 2"),
        (lambda d: d.update(version="1"), "unsupported version"),
        (lambda d: d.update(format="torch.export"), "format"),
        (lambda d: d.pop("nodes"), "missing keys"),
        (lambda d: d.update(extra=1), "unknown keys"),
        (lambda d: d.update(nodes={}), "'nodes' must be a list"),
        (lambda d: d.update(dynamic=1), "'dynamic' must be a bool"),
        (lambda d: d.update(dynamic=True), "'dynamic' is True"),
        (lambda d: d.update(outputs=[5]), "output 0"),
        (lambda d: d.update(outputs=[True]), "output 0"),
        (lambda d: d.update(outputs=1), "'outputs' must be a list"),
        (lambda d: d.update(inputs=[[[2, 3], "float32", "tpu"]]), "device type 'tpu'"),
        (lambda d: d.update(inputs=[[[2, -3], "float32", "cpu"]]), "size -3"),
        (lambda d: d.update(inputs=[[[2, 3.5], "float32", "cpu"]]), "size 3.5"),
        (lambda d: d.update(inputs=[[[2, 3], "torch.float32", "cpu"]]), "unknown dtype"),
        (lambda d: d.update(inputs=[[[1] * 65, "float32", "cpu"]]), "at most 64"),
        (lambda d: d.update(inputs=[[2, 3]]), "expected \\[shape, dtype, device type\\]"),
        (lambda d: d.update(weights=[["xyz", "float32", [1]]]), "64 lowercase hex"),
        (lambda d: d.update(weights=[[A_HASH.upper(), "float32", [1]]]), "64 lowercase hex"),
        (lambda d: d.update(weights=[[A_HASH, "qint8", [1]]]), "unknown dtype"),
        (lambda d: d.update(weights=[[A_HASH, "float32", [-1]]]), "size -1"),
    ],
)
def test_bad_documents_are_rejected(mutate, message):
    doc = document([call("aten::add.Tensor", [ref(0), 1])], [1])
    mutate(doc)
    with pytest.raises(PayloadError, match=message):
        decode_graph(pack(doc))


@pytest.mark.parametrize(
    "node,message",
    [
        (["call_method", "add", [ref(0)], {}], "unknown node kind 'call_method'"),
        (["placeholder", "x", [], {}], "unknown node kind"),
        (["get_attr", "weight", [], {}], "unknown node kind"),
        ([1, "aten::add.Tensor", [ref(0), 1], {}], "unknown node kind"),
        (["call_function", "aten::add.Tensor", [ref(0), 1]], "expected \\[kind, target, args, kwargs\\]"),
        ("call_function", "expected \\[kind"),
        (["call_function", 7, [ref(0), 1], {}], "target must be a string"),
        (["call_function", "aten::add.Tensor", {"a": 1}, {}], "args must be a list"),
        (["call_function", "aten::add.Tensor", [ref(0), 1], []], "kwargs must be a map"),
        (call("aten::add.Tensor", [ref(1), 1]), "reference 1 is not an earlier node"),
        (call("aten::add.Tensor", [ref(-1), 1]), "reference -1"),
        (call("aten::add.Tensor", [ref(True), 1]), "reference True"),
        (call("aten::add.Tensor", [ref("0"), 1]), "reference '0'"),
        (call("aten::add.Tensor", [{"ref": 0, "dtype": "float32"}, 1]), "exactly one key"),
        (call("aten::add.Tensor", [{"eval": HOSTILE_STRING}, 1]), "unknown tag 'eval'"),
        (call("aten::add.Tensor", [ref(0), 2**63]), "does not fit in int64"),
        (call("aten::add.Tensor", [ref(0)]), "missing argument 'other'"),
        (call("aten::add.Tensor", [ref(0), 1, 2]), "3 positional arguments"),
        (call("aten::add.Tensor", [ref(0), 1], {"bogus": 1}), "unknown keyword argument 'bogus'"),
        (call("aten::add.Tensor", [ref(0), 1], {"other": 1}), "given twice"),
        (call("aten::add.Tensor", [ref(0), 1], {"alpha": "1"}), "argument 'alpha'"),
        (call("aten::add.Tensor", [ref(0), 1], {"not an identifier": 1}), "not an identifier"),
        (call("aten::full.default", [[2], 1.0], {"dtype": {"dtype": "object"}}), "unknown dtype 'object'"),
        (call("aten::full.default", [[2], 1.0], {"dtype": "float32"}), "argument 'dtype'"),
        (call("aten::full.default", [[2], 1.0], {"device": {"device": ["file", 0]}}), "device type 'file'"),
        (call("aten::full.default", [[2], 1.0], {"device": {"device": ["cuda", -1]}}), "device index -1"),
        (call("aten::full.default", [[2], 1.0], {"device": "cuda"}), "argument 'device'"),
        (call("aten::full.default", [["2"], 1.0]), "argument 'size'"),
        (call("aten::clone.default", [ref(0)], {"memory_format": {"memory_format": "x"}}), "unknown memory format"),
        (call("aten::mul.Scalar", [ref(0), {"complex": ["1", 0]}]), "complex must be"),
        (call("aten::mul.Scalar", [ref(0), {"complex": [float("inf"), 0]}]), "complex must be"),
        (call("aten::bernoulli.default", [ref(0)], {"generator": 1}), "argument 'generator'"),
        (call("operator::getitem", [ref(0), "0"]), "expected \\(node, int\\)"),
        (call("operator::mul", ["ab", 10**9]), "expected node references or numbers"),
        (call("operator::mul", [[1], 10**9]), "expected node references or numbers"),
        (call("operator::mul", [ref(0)]), "takes 2 arguments"),
        (call("operator::neg", [ref(0)], {"x": 1}), "no keyword arguments"),
    ],
)
def test_bad_nodes_are_rejected(node, message):
    with pytest.raises(PayloadError, match=message):
        decode_graph(pack(document([node], [1])))


def test_writing_a_weight_in_place_is_rejected():
    doc = weighted_document()
    doc["nodes"] = [call("aten::add_.Tensor", [ref(0), 1])]
    doc["outputs"] = [2]
    with pytest.raises(PayloadError, match="may alias a weight"):
        decode_graph(pack(doc))


def test_writing_a_weight_through_a_view_or_out_argument_is_rejected():
    through_view = weighted_document()
    through_view["nodes"] = [
        call("aten::view.default", [ref(0), [12]]),
        call("operator::getitem", [ref(2), 0]),  # a scalar view of the view
        call("aten::copy_.default", [ref(3), ref(1)]),
    ]
    through_view["outputs"] = [4]
    with pytest.raises(PayloadError, match="may alias a weight"):
        decode_graph(pack(through_view))
    through_out = weighted_document()
    through_out["nodes"] = [call("aten::mm.out", [ref(1), ref(1)], {"out": ref(0)})]
    through_out["outputs"] = [2]
    with pytest.raises(PayloadError, match="may alias a weight"):
        decode_graph(pack(through_out))
    unsafe_view = weighted_document()
    unsafe_view["nodes"] = [call("aten::_unsafe_view.default", [ref(0), [12]]), call("aten::zero_.default", [ref(2)])]
    unsafe_view["outputs"] = [3]
    with pytest.raises(PayloadError, match="may alias a weight"):
        decode_graph(pack(unsafe_view))


def test_writing_a_user_input_in_place_is_reported():
    doc = document(
        [call("aten::mul.Tensor", [ref(0), 2]), call("aten::copy_.default", [ref(0), ref(1)])], [1]
    )
    decoded = decode_graph(pack(doc))
    assert decoded.mutated_inputs == (0,)
    x = torch.ones(2, 3)
    decoded.module(x)
    torch.testing.assert_close(x, torch.full((2, 3), 2.0))


def test_writing_a_fresh_intermediate_in_place_is_fine():
    doc = document([call("aten::full.default", [[2, 3], 1.0]), call("aten::add_.Tensor", [ref(1), ref(0)])], [2])
    assert decode_graph(pack(doc)).mutated_inputs == ()


def test_alias_tracking_is_conservative():
    # mul's result is fresh memory, but the decoder does not trust schemas to say so
    doc = document([call("aten::mul.Tensor", [ref(0), 2]), call("aten::add_.Tensor", [ref(1), 1])], [2])
    assert decode_graph(pack(doc)).mutated_inputs == (0,)
    from_weight = weighted_document()
    from_weight["nodes"] = [call("aten::mm.default", [ref(1), ref(0)]), call("aten::relu_.default", [ref(2)])]
    from_weight["outputs"] = [3]
    with pytest.raises(PayloadError, match="may alias a weight"):
        decode_graph(pack(from_weight))


@pytest.mark.parametrize(
    "view",
    [
        call("aten::lift.default", [ref(0)]),
        call("aten::unsafe_chunk.default", [ref(0), 1]),
        call("aten::unsafe_split.Tensor", [ref(0), 3]),
        call("aten::_reshape_from_tensor.default", [ref(0), ref(1)]),
    ],
    ids=["lift", "unsafe_chunk", "unsafe_split", "reshape_from_tensor"],
)
def test_views_without_alias_annotations_cannot_reach_a_weight(view):
    doc = weighted_document()
    doc["nodes"] = [view, call("aten::zero_.default", [ref(2)])]
    doc["outputs"] = [3]
    with pytest.raises(PayloadError, match="may alias a weight"):
        decode_graph(pack(doc))


def test_writes_past_the_tracking_limit_report_every_input():
    count = payload.MAX_TRACKED_INPUTS + 6
    inputs = [[[2], "float32", "cpu"]] * count
    nodes = [call("aten::stack.default", [[ref(i) for i in range(count)]]), call("aten::add_.Tensor", [ref(count), 1])]
    decoded = decode_graph(pack(document(nodes, [count + 1], inputs=inputs)))
    assert decoded.mutated_inputs == tuple(range(count))


def test_alias_tracking_stays_linear_for_hostile_graphs():
    weights = [["%064x" % i, "float32", [1]] for i in range(5000)]
    nodes = [call("aten::add.Tensor", [ref(5000), ref(0)])]
    nodes += [call("aten::add.Tensor", [ref(5001 + i), ref(i + 1)]) for i in range(4999)]
    start = time.perf_counter()
    decode_graph(pack(document(nodes, [len(weights) + len(nodes)], weights=weights)))
    assert time.perf_counter() - start < 5.0


# ---------------------------------------------------------------------------------------------
# Garbage and bombs: PayloadError, quickly


def test_random_bytes_are_rejected():
    rng = random.Random(1234)
    for _ in range(500):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))
        with pytest.raises(PayloadError):
            decode_graph(data)


def test_random_mutations_of_a_valid_payload_never_escape_as_other_errors():
    rng = random.Random(99)
    base = bytearray(pack(weighted_document()))
    for _ in range(500):
        data = bytearray(base)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
        try:
            decode_graph(bytes(data))
        except PayloadError:
            pass


def test_every_truncation_is_rejected():
    data = pack(weighted_document())
    for end in range(len(data)):
        with pytest.raises(PayloadError):
            decode_graph(data[:end])


def test_trailing_bytes_are_rejected():
    with pytest.raises(PayloadError, match="malformed"):
        decode_graph(ADD_ONE + b"\xc0")


@pytest.mark.parametrize(
    "data",
    [
        b"\x91" * 200_000 + b"\xc0",  # arrays nested 200k deep
        b"\x81\xa1a" * 100_000 + b"\xc0",  # maps nested 100k deep
        b"\xdd\xff\xff\xff\xff",  # array32 declaring 4 billion items, none present
        b"\xdf\xff\xff\xff\xff",  # map32 declaring 4 billion entries
        b"\xdb\xff\xff\xff\xff" + b"a" * 100,  # str32 declaring 4 GiB
        b"\xc6\xff\xff\xff\xff" + b"a" * 100,  # bin32 declaring 4 GiB
        b"\xc9\xff\xff\xff\xff\x01",  # ext32 declaring 4 GiB
        b"\xd6\xff\x00\x00\x00\x00",  # msgpack timestamp (ext -1)
        b"\xd4\x01\x00",  # fixext 1
        b"\xa4\xff\xfe\xfd\xfc",  # str with invalid UTF-8
        b"\x81\x01\x02",  # map with an int key
    ],
    ids=["deep-arrays", "deep-maps", "array32", "map32", "str32", "bin32", "ext32", "timestamp",
         "fixext", "bad-utf8", "int-key"],
)
def test_msgpack_bombs_are_rejected_quickly(data):
    start = time.perf_counter()
    with pytest.raises(PayloadError):
        decode_graph(data)
    assert time.perf_counter() - start < 1.0


def test_deeply_nested_arguments_are_rejected():
    nested: list = [1]
    for _ in range(100):
        nested = [nested]
    with pytest.raises(PayloadError, match="nested deeper"):
        decode_graph(pack(document([call("aten::add.Tensor", [ref(0), nested])], [1])))


def test_oversized_payloads_and_node_counts_are_rejected():
    with pytest.raises(PayloadError, match="exceeds the limit"):
        decode_graph(ADD_ONE, max_bytes=len(ADD_ONE) - 1)
    many = pack(document([call("aten::add.Tensor", [ref(0), 1])] * 50, [1]))
    with pytest.raises(PayloadError):
        decode_graph(many, max_nodes=20)


def test_huge_strings_are_rejected():
    data = pack(document([call("aten::gelu.default", [ref(0)], {"approximate": "x" * (1 << 20)})], [1]))
    with pytest.raises(PayloadError, match="malformed"):
        decode_graph(data)


def test_non_bytes_input_is_rejected():
    with pytest.raises(PayloadError, match="expected bytes"):
        decode_graph("not bytes")  # type: ignore[arg-type]


def test_unexpected_internal_errors_are_wrapped(monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(_GraphDecoder, "_add_output", broken)
    with pytest.raises(PayloadError, match="KeyError"):
        decode_graph(ADD_ONE)


# ---------------------------------------------------------------------------------------------
# Weight blobs


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 4),
        torch.randn(5, dtype=torch.float64),
        torch.randn(2, 2).to(torch.bfloat16),
        torch.randn(2, 2).half(),
        torch.tensor([True, False, True]),
        torch.randn(2, dtype=torch.complex64),
        torch.arange(6, dtype=torch.int64).reshape(2, 3),
        torch.arange(6, dtype=torch.uint8),
        torch.tensor(3.5),
        torch.empty(0, 4),
        torch.randn(4, 6).t(),  # non-contiguous
        torch.randn(10)[3:7],  # storage offset
        torch.nn.Parameter(torch.randn(3)),
    ],
    ids=["f32", "f64", "bf16", "f16", "bool", "c64", "i64", "u8", "scalar", "empty", "transposed",
         "offset", "param"],
)
def test_weight_blobs_round_trip(tensor):
    blob = tensor_to_weight_blob(tensor)
    digest = blob.content_hash()
    for candidate in (blob, unpack_weight_blob(pack_weight_blob(blob))):
        rebuilt = weight_to_tensor(candidate, expected_hash=digest)
        assert rebuilt.dtype == tensor.dtype and rebuilt.shape == tensor.shape
        torch.testing.assert_close(rebuilt, tensor.detach(), equal_nan=True)
        rebuilt.add_(1) if rebuilt.dtype != torch.bool and rebuilt.numel() else None  # writable


def test_weight_hash_covers_dtype_and_shape():
    data = bytes(16)
    assert len({weight_hash("float32", (4,), data), weight_hash("int32", (4,), data),
                weight_hash("float32", (2, 2), data)}) == 3


def test_weight_blob_with_wrong_byte_length_is_rejected():
    with pytest.raises(PayloadError, match="needs 48"):
        weight_to_tensor(WeightBlob("float32", (3, 4), bytes(47)))


def test_weight_blob_with_unknown_dtype_is_rejected():
    with pytest.raises(PayloadError, match="unknown dtype"):
        weight_to_tensor(WeightBlob("qint8", (3,), bytes(3)))
    with pytest.raises(PayloadError, match="unknown dtype"):
        weight_to_tensor(WeightBlob("__class__", (3,), bytes(3)))


def test_weight_blob_that_does_not_match_its_hash_is_rejected():
    blob = tensor_to_weight_blob(torch.ones(3))
    forged = WeightBlob(blob.dtype, blob.shape, bytes(len(blob.data)))
    with pytest.raises(PayloadError, match="does not match its hash"):
        weight_to_tensor(forged, expected_hash=blob.content_hash())


def test_weight_blob_with_huge_declared_shape_is_rejected_without_allocating():
    with pytest.raises(PayloadError, match="needs"):
        weight_to_tensor(WeightBlob("float32", (2**40, 2**20), bytes(4)))


@pytest.mark.parametrize(
    "data",
    [
        b"garbage",
        msgpack.packb(["cgtree.weight", 2, "float32", [1], bytes(4)]),
        msgpack.packb(["cgtree.weight", 1, "float32", [1], "text"]),
        msgpack.packb(["cgtree.weight", 1, "float32", [-1], bytes(4)], use_bin_type=True),
        msgpack.packb(["other", 1, "float32", [1], bytes(4)], use_bin_type=True),
        msgpack.packb({"dtype": "float32"}),
        msgpack.packb(["cgtree.weight", 1, "float32", [1], msgpack.ExtType(1, b"x")], use_bin_type=True),
    ],
)
def test_malformed_weight_blobs_are_rejected(data):
    with pytest.raises(PayloadError):
        unpack_weight_blob(data)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_tensors_that_cannot_be_weights_are_rejected():
    with pytest.raises(PayloadError, match="meta"):
        tensor_to_weight_blob(torch.empty(3, device="meta"))
    with pytest.raises(PayloadError, match="dense"):
        tensor_to_weight_blob(torch.eye(3).to_sparse())
    with pytest.raises(PayloadError, match="unsupported dtype"):
        tensor_to_weight_blob(torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8))


# ---------------------------------------------------------------------------------------------
# Encoder refusals


def _graph(build) -> torch.fx.GraphModule:
    """A module whose graph gets ``build``'s nodes after construction (fx could not compile them)."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(2, 3)
    output = graph.output(None)
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    with graph.inserting_before(output):
        output.args = (build(graph, x),)
    return module


@pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr Node")
@pytest.mark.parametrize(
    "build,message",
    [
        (lambda g, x: (g.call_function(torch.ops.aten.add.Tensor, (x, slice(1))),), "of type slice"),
        (lambda g, x: (g.call_function(torch.ops.aten.add.Tensor, (x, object())),), "unsupported argument"),
        (lambda g, x: (g.call_function(torch.ops.aten.add.Tensor, (x, torch.ones(1))),), "tensor constant"),
        (lambda g, x: (g.call_function(torch.ops.aten.add, (x, 1)),), "overload packet"),
        (lambda g, x: (g.call_function(torch.add, (x, 1)),), "unsupported call target"),
        (lambda g, x: (g.call_function(eval, ("1",)),), "unsupported call target"),
        (lambda g, x: (g.call_method("add", (x, 1)),), "call_method nodes are not supported"),
        (lambda g, x: (g.get_attr("weight"),), "lift constants"),
        (lambda g, x: (g.call_function(torch.ops.aten.add.Tensor, (x, 2**70)),), "int64"),
        (lambda g, x: 3, "flat tuple of nodes"),
    ],
)
def test_encoder_rejects_what_the_format_cannot_carry(build, message):
    with pytest.raises(PayloadError, match=message):
        encode_graph(_graph(build), [])


def test_encoder_needs_input_specs_without_example_values():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output((graph.call_function(operator.neg, (x,)),))
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    with pytest.raises(PayloadError, match="input_specs"):
        encode_graph(module, [])
    encoded = encode_graph(module, [], [InputSpec((None,), "float32", "cpu")])
    decoded = decode_graph(encoded.graph_bytes)
    assert decoded.dynamic and decoded.graph_id == encoded.graph_id


def test_struct_packed_header_sanity():
    # a fixmap header claiming 7 keys but holding none: truncated input
    with pytest.raises(PayloadError):
        decode_graph(struct.pack("B", 0x87))


def test_an_encoded_graph_saved_to_disk_loads_back_identical_and_checks_its_hashes(tmp_path):
    from cgtree.client.lowering import encode, lower
    from cgtree.payload import load_encoded, save_encoded

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval()
    encoded = encode(lower(model, [torch.randn(2, 8)]))
    path = tmp_path / "model.cgtree"
    save_encoded(encoded, path)
    loaded = load_encoded(path)
    assert loaded.graph_id == encoded.graph_id and loaded.graph_bytes == encoded.graph_bytes
    assert loaded.weight_hashes == encoded.weight_hashes and loaded.input_specs == encoded.input_specs
    assert {h: b.data for h, b in loaded.weights.items()} == {h: bytes(b.data) for h, b in encoded.weights.items()}

    import msgpack

    from cgtree.payload import WeightBlob, pack_weight_blob, unpack_weight_blob

    doc = msgpack.unpackb(path.read_bytes(), raw=False)
    weight_hash_, packed = doc["weights"][0]
    blob = unpack_weight_blob(packed)
    tampered = bytearray(blob.data)
    tampered[0] ^= 0xFF
    doc["weights"][0] = [weight_hash_, pack_weight_blob(WeightBlob(blob.dtype, blob.shape, bytes(tampered)))]
    path.write_bytes(msgpack.packb(doc, use_bin_type=True))
    with pytest.raises(PayloadError, match="does not match its data"):
        load_encoded(path)
    path.write_bytes(b"\x93garbage")
    with pytest.raises(PayloadError):
        load_encoded(path)


def test_a_hidden_write_to_a_weight_is_rejected_by_the_decoder():
    """native_batch_norm in training mode writes its running statistics without saying so in
    its schema: a payload aiming it at shared weights is refused (the client's lowering refuses
    it too, but the daemon must not rely on the client). In eval mode it reads them only."""
    stats = [["%064x" % 1, "float32", [3]], ["%064x" % 2, "float32", [3]]]
    inputs = [[[2, 3], "float32", "cpu"]]

    def batch_norm(training):
        nodes = [call("aten::native_batch_norm.default", [ref(2), None, None, ref(0), ref(1), training, 0.1, 1e-5]),
                 call("operator::getitem", [ref(3), 0])]
        return pack(document(nodes, [4], weights=stats, inputs=inputs))

    with pytest.raises(PayloadError, match="may alias a weight"):
        decode_graph(batch_norm(True))
    decoded = decode_graph(batch_norm(False))
    assert decoded.mutated_inputs == ()
