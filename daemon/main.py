"""``cgtreed``: parse the command line, load the configuration, set up logging, run the daemon.

    cgtreed [--config config.toml] [--endpoint ipc:///path/s] [--devices cpu|auto|cuda:0,cuda:1]

``--endpoint`` and ``--devices`` override ``[daemon]`` of the file, at start and after every
reload. Exit codes: 0 clean stop; 1 forced stop (second signal, shutdown deadline); 70 a
sticky CUDA error (restart us); 78 cannot start (bad configuration, endpoint in use, unusable
device or runtime directory, expandable segments on a CUDA device, metrics port unusable).
"""

from __future__ import annotations

from cgtree.daemon import startup

startup.mark("main")  # the first line of cgtreed's own: the interpreter's start-up ends here

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from cgtree.config import Config, ConfigError, DaemonConfig, load_config  # noqa: E402

log = logging.getLogger("cgtree.daemon.main")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cgtreed", description="cgtree daemon: CUDA graph trees as a shared service.")
    parser.add_argument("--config", metavar="PATH", help="config.toml (default: built-in defaults; SIGHUP re-reads it)")
    parser.add_argument("--endpoint", metavar="URL", help="ZeroMQ endpoint, e.g. ipc:///run/cgtree/cgtreed.sock (overrides daemon.endpoint)")
    parser.add_argument("--devices", metavar="LIST", help='"auto", "cpu", or a comma-separated list such as cuda:0,cuda:1 (overrides daemon.devices)')
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    """The file's configuration with the command-line overrides applied (and validated)."""
    config = load_config(args.config) if args.config else Config()
    overrides = {}
    if args.endpoint:
        overrides["endpoint"] = args.endpoint
    if args.devices:
        devices = args.devices.strip()
        overrides["devices"] = devices if devices in ("auto", "cpu") else tuple(d.strip() for d in devices.split(",") if d.strip())
    if overrides:
        config = dataclasses.replace(config, daemon=dataclasses.replace(config.daemon, **overrides))
    return config


def main(argv: Optional[Sequence[str]] = None) -> int:
    from cgtree.daemon.logsetup import configure_logging
    from cgtree.daemon.server import EXIT_START_FAILED

    startup.mark("imports")

    args = parse_args(argv)
    # Logging first, with the defaults: even a bad configuration file is reported in the
    # daemon's log format (journald priorities under systemd).
    configure_logging(DaemonConfig.log_level, DaemonConfig.log_format)
    try:
        config = build_config(args)
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_START_FAILED
    configure_logging(config.daemon.log_level, config.daemon.log_format)

    from cgtree.daemon.runtime_dir import RuntimeDirError, resolve_endpoint
    from cgtree.daemon.server import EXIT_OK, Daemon, StartError

    try:
        endpoint = resolve_endpoint(config.daemon.endpoint)
        daemon = Daemon(config, endpoint=endpoint, config_path=args.config,
                        reload_config=lambda: build_config(args))  # a reload keeps the command line's overrides
    except (RuntimeDirError, StartError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_START_FAILED
    code = daemon.run()
    if code != EXIT_OK:
        # A sticky CUDA error poisoned the context, or the stop was forced: interpreter
        # teardown (torch's atexit hooks, allocator frees) could fail or hang. Leave now; the
        # supervisor restarts us.
        logging.shutdown()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
