"""The ``fedsite`` command: one entry point, one module per sub-command.

Sub-command modules are imported lazily, by one small loader each. Each module exposes ``add_arguments(parser)`` and
``run(args) -> int``. This dispatcher lives in ``simulations`` because it is the
one package allowed to import ``client``, ``server`` and ``shared_models``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from types import ModuleType

# Hospitals are often air-gapped: never phone home, whatever the entry point.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

# Each loader imports its sub-command module when the command runs (torch/flwr import time is paid
# only by the command that needs it); the imports are plain statements, visible to every tool.


def _simulate() -> ModuleType:
    from simulations import run

    return run


def _reproduce() -> ModuleType:
    from simulations import reproduce

    return reproduce


def _synth() -> ModuleType:
    from simulations import synth_cli

    return synth_cli


def _bench() -> ModuleType:
    from simulations import bench

    return bench


def _reference() -> ModuleType:
    from simulations import reference

    return reference


def _bench_norms() -> ModuleType:
    from simulations import bench_norms

    return bench_norms


def _models() -> ModuleType:
    from simulations import models_cli

    return models_cli


def _provision() -> ModuleType:
    from server import provision

    return provision


def _fab_hash() -> ModuleType:
    from server import fab_hash_cli

    return fab_hash_cli


def _server() -> ModuleType:
    from server import daemon

    return daemon


def _client() -> ModuleType:
    from client import daemon

    return daemon


def _predict() -> ModuleType:
    from client import predict

    return predict


def _prepare_data() -> ModuleType:
    from client import prepare

    return prepare


def _adapt() -> ModuleType:
    from simulations import adapt

    return adapt


COMMANDS: dict[str, tuple[Callable[[], ModuleType], str]] = {
    "simulate": (_simulate, "run a federated domain-shift experiment on Flower's simulation engine"),
    "reproduce": (_reproduce, "run the reference experiments (simulations/configs) and rewrite simulations/RESULTS.md"),
    "synth": (_synth, "write the synthetic multi-site domain-shift dataset to disk"),
    "bench": (_bench, "measure the training loop and the simulation engine against plain PyTorch"),
    "reference": (_reference, "train fedsite's pooled arm of a finished run with a plain PyTorch loop and compare the Dice"),
    "bench-norms": (_bench_norms, "time each registered norm against BatchNorm (2D and 3D) and DualNorm-UNet against the UNet"),
    "models": (_models, "list registered models with parameter and MAC counts"),
    "provision": (_provision, "create the federation's CA, server certificate, per-site auth keys, server.yaml and sites/<site>.yaml"),
    "fab-hash": (_fab_hash, "print the sha256 of the Flower App Bundle this fedsite version submits (a site's approved-fabs)"),
    "server": (_server, "run the aggregation server: SuperLink (TLS, node auth, database) + the configured federation"),
    "client": (_client, "run one site's daemon: a SuperNode with the site's key, data, local state, health and metrics"),
    "predict": (_predict, "segment NIfTI images with a site's personalised model (latest global + its local tensors)"),
    "prepare-data": (_prepare_data, "convert per-site folders (foundation or MSD/nnU-Net imagesTr/labelsTr) to the foundation layout, RAS, common spacing"),
    "adapt": (_adapt, "build a never-trained site's model from a finished federation (average, AdaBN, SN batch average) and score it"),
}


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("fedsite")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsite", description="Federated segmentation with site-local normalization.")
    parser.add_argument("--version", action="store_true", help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["--version"]:
        print(f"fedsite {_version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})")
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    module = COMMANDS[name][0]()
    sub = argparse.ArgumentParser(prog=f"fedsite {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    return int(module.run(sub.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
