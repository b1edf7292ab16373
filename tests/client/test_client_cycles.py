"""1,000 clients opened and closed in a row never hang (issue 14): a client's ``close()`` used to
terminate its own ZeroMQ context, and ``Context.term()`` hung now and then; every ``Client`` of a
process now shares one context that is never terminated, and ``close()`` only closes its socket
(LINGER 0). Runs in a subprocess with a deadline, so a hang fails the test instead of CI."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CYCLES = textwrap.dedent("""
    import faulthandler, os, sys, time
    import torch
    from cgtree.client import Client
    from cgtree.client import connection as client_module
    from cgtree.client.lowering import encode, lower

    faulthandler.dump_traceback_later(float(sys.argv[2]), exit=True)  # where it hung, if it does
    endpoint = sys.argv[1]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval()
    x = torch.randn(2, 8)
    encoded = encode(lower(model, [x]))

    def fds():
        return len(os.listdir("/proc/self/fd"))

    def cycle(submit):
        client = Client(endpoint, timeout_s=30)
        if submit:
            (out,) = client.submit(client.register(encoded, [x]), [x])
            torch.testing.assert_close(out, model(x))
        else:
            assert client.ping()["pong"]
        client.close()

    cycle(True)
    context, before, started = client_module._zmq_context(), fds(), time.monotonic()
    for _ in range(1000):
        cycle(False)
    pings = time.monotonic() - started
    for _ in range(100):
        cycle(True)
    time.sleep(0.2)  # ZeroMQ closes sockets asynchronously
    assert client_module._zmq_context() is context and not context.closed
    print(f"pings {pings:.2f} s, total {time.monotonic() - started:.2f} s, fds {before} -> {fds()}")
    assert fds() <= before + 8, "sockets leak"
""")


def test_a_thousand_clients_open_and_close_without_a_hang(daemon_factory):
    daemon = daemon_factory()
    # ~5 s alone on a 2-core machine; the deadline only guards against a hang.
    result = subprocess.run([sys.executable, "-c", CYCLES, daemon.endpoint, "110"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "pings" in result.stdout, result.stdout
    print(result.stdout)
