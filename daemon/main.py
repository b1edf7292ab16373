"""``cgtreed``: parse the command line, load the configuration, set up logging, run the daemon.

    cgtreed [--config config.toml] [--endpoint ipc:///path/s] [--devices cpu|auto|cuda:0,cuda:1]

``--endpoint`` and ``--devices`` override ``[daemon]`` of the file. Exit codes: 0 clean stop;
1 forced stop (second signal, shutdown deadline); 70 a sticky CUDA error (restart us);
78 cannot start (bad configuration, endpoint in use, unusable device or runtime directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Optional, Sequence

from cgtree.config import Config, ConfigError, load_config

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
    from cgtree.daemon.server import EXIT_CUDA_ERROR, EXIT_START_FAILED

    args = parse_args(argv)
    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"cgtreed: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    _configure_logging(config)

    from cgtree.daemon.runtime_dir import RuntimeDirError, resolve_endpoint
    from cgtree.daemon.server import Daemon, StartError

    try:
        endpoint = resolve_endpoint(config.daemon.endpoint)
        daemon = Daemon(config, endpoint=endpoint, config_path=args.config)
    except (RuntimeDirError, StartError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_START_FAILED
    code = daemon.run()
    if code == EXIT_CUDA_ERROR:
        # The CUDA context is poisoned: interpreter teardown (torch's atexit hooks, allocator
        # frees) could fail or hang in it. Leave now; the supervisor restarts us.
        logging.shutdown()
        os._exit(code)
    return code


def _configure_logging(config: Config) -> None:
    try:
        from cgtree.daemon.logsetup import configure_logging
    except ImportError:
        logging.basicConfig(level=config.daemon.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    configure_logging(config.daemon.log_level, config.daemon.log_format)


if __name__ == "__main__":
    sys.exit(main())
