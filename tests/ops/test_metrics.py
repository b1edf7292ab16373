"""Prometheus metrics: scraped over HTTP from an ephemeral loopback port, values as observed;
NullMetrics does nothing with the same methods; make_metrics(0) needs no prometheus-client."""

from __future__ import annotations

import inspect
import socket
import sys
import urllib.error
import urllib.request

import pytest

from cgtree.daemon.metrics import (
    MAX_SKIP_REASON_LABELS,
    Metrics,
    MetricsUnavailableError,
    NullMetrics,
    make_metrics,
    skip_reason_label,
)


@pytest.fixture
def metrics():
    started = Metrics()
    started.start(0)
    yield started
    started.stop()


def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as {'name{labels}': value}, comment lines dropped."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def test_start_binds_an_ephemeral_loopback_port(metrics):
    assert metrics.port and metrics.port > 0
    assert scrape(metrics.port)["cgtree_submits_total"] == 0.0


def test_submits_are_counted_by_mode_and_skip_reason(metrics):
    for _ in range(3):
        metrics.observe_submit(30e-6, "replayed")
    metrics.observe_submit(8e-3, "recorded")
    metrics.observe_submit(2e-3, "warmup")
    metrics.observe_submit(1e-4, "skipped", "mutated inputs (2 instances). Found from : File x.py")
    metrics.observe_submit(1e-4, "skipped", "mutated inputs (1 instances). Found from : File y.py")
    metrics.observe_submit(1e-4, "skipped", "cpu device (arg0_1)")
    samples = scrape(metrics.port)
    assert samples["cgtree_submits_total"] == 8
    assert samples["cgtree_replays_total"] == 3
    assert samples["cgtree_recordings_total"] == 1
    assert samples["cgtree_warmups_total"] == 1
    assert samples['cgtree_skips_total{reason="mutated_inputs"}'] == 2
    assert samples['cgtree_skips_total{reason="cpu_device"}'] == 1
    assert not any("Found from" in key for key in samples)


def test_submit_latency_histogram_spans_10_us_to_1_s(metrics):
    metrics.observe_submit(5e-6, "replayed")  # below the first bucket
    metrics.observe_submit(30e-6, "replayed")
    metrics.observe_submit(0.7, "recorded")
    metrics.observe_submit(3.0, "recorded")  # a compile: only in +Inf
    samples = scrape(metrics.port)
    bucket = 'cgtree_submit_latency_seconds_bucket{le="%s"}'
    assert samples[bucket % "1e-05"] == 1
    assert samples[bucket % "5e-05"] == 2
    assert samples[bucket % "0.5"] == 2
    assert samples[bucket % "1.0"] == 3
    assert samples[bucket % "+Inf"] == 4
    assert samples["cgtree_submit_latency_seconds_count"] == 4
    assert samples["cgtree_submit_latency_seconds_sum"] == pytest.approx(3.700035)


def test_gauges_report_the_last_value_per_device(metrics):
    metrics.set_pool_bytes("cuda:0", 1 << 20)
    metrics.set_pool_bytes("cuda:1", 5)
    metrics.set_pool_bytes("cuda:0", 2 << 20)
    metrics.set_live_blocks("cuda:0", 7)
    metrics.set_sessions(3)
    metrics.set_sessions(2)
    samples = scrape(metrics.port)
    assert samples['cgtree_pool_bytes{device="cuda:0"}'] == 2 << 20
    assert samples['cgtree_pool_bytes{device="cuda:1"}'] == 5
    assert samples['cgtree_live_blocks{device="cuda:0"}'] == 7
    assert samples["cgtree_sessions"] == 2


def test_an_unknown_mode_is_refused_and_counts_nothing(metrics):
    with pytest.raises(ValueError, match="'replay'"):
        metrics.observe_submit(1e-5, "replay")
    assert scrape(metrics.port)["cgtree_submits_total"] == 0


def test_each_metrics_has_its_own_registry():
    first, second = Metrics(), Metrics()  # same names twice in one process: no clash
    first.observe_submit(1e-5, "replayed")
    assert b"cgtree_replays_total 1.0" in first.render()
    assert b"cgtree_replays_total 0.0" in second.render()
    assert b"python_gc" not in first.render()  # nothing from the global registry


def test_stop_closes_the_port_and_is_idempotent():
    metrics = Metrics()
    port = metrics.start(0)
    metrics.stop()
    metrics.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_starting_twice_is_refused(metrics):
    with pytest.raises(RuntimeError, match="already started"):
        metrics.start(0)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "example.com"])
def test_only_loopback_hosts_are_accepted(host):
    with pytest.raises(ValueError, match="loopback"):
        Metrics().start(0, host=host)


def test_ipv6_loopback_is_accepted():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    metrics = Metrics()
    try:
        port = metrics.start(0, host="::1")
    except OSError as exc:
        pytest.skip(f"cannot bind ::1 here: {exc}")
    try:
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5) as response:
            assert b"cgtree_sessions" in response.read()
    finally:
        metrics.stop()


def test_a_busy_port_fails_naming_the_address(metrics):
    with pytest.raises(OSError, match=f"127.0.0.1:{metrics.port}"):
        Metrics().start(metrics.port)


def test_skip_reason_labels_are_short_categories():
    assert skip_reason_label("mutated inputs (3 instances). Found from : trace") == "mutated_inputs"
    assert skip_reason_label("cpu device (primals_1)") == "cpu_device"
    assert skip_reason_label("multiple devices") == "multiple_devices"
    assert skip_reason_label("graph with symbolic shapes inputs") == "dynamic_shapes"
    assert skip_reason_label("incompatible op aten.nonzero.default") == "incompatible_op"
    assert skip_reason_label("size not in capture_sizes (3; allowed: [1, 2])") == "capture_sizes"
    assert skip_reason_label("re-recording limit (128) exceeded under node 3: moved") == "rerecord_limit"
    assert skip_reason_label("device mismatch (x on cuda:1, graphs on cuda:0)") == "device_mismatch"
    assert skip_reason_label(None) == skip_reason_label("") == "unknown"


def test_unknown_skip_reasons_keep_their_leading_words():
    assert skip_reason_label("Weird Thing: detail") == "weird_thing"
    assert skip_reason_label("op aten.foo unsupported") == "op_aten"
    assert skip_reason_label("(nothing but detail)") == "unknown"


def test_a_reason_object_is_labelled_by_its_kind():
    class SkipReason:  # the shape of cgtree.skips.SkipReason
        kind = "cpu device"
        detail = " (arg0)"

    assert skip_reason_label(SkipReason()) == "cpu_device"


def test_skip_reason_labels_are_bounded(metrics):
    for i in range(MAX_SKIP_REASON_LABELS + 10):
        metrics.observe_submit(1e-5, "skipped", f"reason {chr(97 + i % 26)}{chr(97 + i // 26)}")
    samples = scrape(metrics.port)
    skip_series = [key for key in samples if key.startswith("cgtree_skips_total{")]
    assert len(skip_series) == MAX_SKIP_REASON_LABELS + 1
    assert samples['cgtree_skips_total{reason="other"}'] == 10


def test_make_metrics_zero_is_null_and_needs_no_prometheus_client(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import now fails
    metrics = make_metrics(0)
    assert isinstance(metrics, NullMetrics)
    metrics.observe_submit(1e-5, "skipped", "anything")
    metrics.set_pool_bytes("cuda:0", 1)
    metrics.set_live_blocks("cuda:0", 1)
    metrics.set_sessions(1)
    metrics.stop()
    assert metrics.render() == b""


def test_make_metrics_without_prometheus_client_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(MetricsUnavailableError, match="prometheus-client"):
        make_metrics(9400)


def test_make_metrics_with_a_port_serves_on_it():
    with socket.socket() as probe:  # find a free port, then let make_metrics bind it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics = make_metrics(port)
    try:
        assert isinstance(metrics, Metrics) and metrics.port == port
        assert "cgtree_sessions" in scrape(port)
    finally:
        metrics.stop()


def test_null_metrics_has_every_public_method_of_metrics_with_the_same_signature():
    public = {
        name: member
        for name, member in inspect.getmembers(Metrics, inspect.isfunction)
        if not name.startswith("_")
    }
    for name, method in public.items():
        null_method = getattr(NullMetrics, name)
        assert inspect.signature(null_method) == inspect.signature(method), name
