"""The ``fedsite`` command: one entry point, one module per sub-command.

Sub-command modules are imported lazily (torch/flwr import time is paid only by
the command that needs it). Each module exposes ``add_arguments(parser)`` and
``run(args) -> int``. This dispatcher lives in ``simulations`` because it is the
one package allowed to import ``client``, ``server`` and ``shared_models``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Hospitals are often air-gapped: never phone home, whatever the entry point.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("simulations.run", "run a federated domain-shift experiment on Flower's simulation engine"),
    "reproduce": ("simulations.reproduce", "run the reference experiments (simulations/configs) and rewrite simulations/RESULTS.md"),
    "synth": ("simulations.synth_cli", "write the synthetic multi-site domain-shift dataset to disk"),
    "bench": ("simulations.bench", "measure the training loop and the simulation engine against plain PyTorch"),
    "bench-norms": ("simulations.bench_norms", "time each registered norm against BatchNorm (2D and 3D) and DualNorm-UNet against the UNet"),
    "models": ("simulations.models_cli", "list registered models with parameter and MAC counts"),
    "provision": ("server.provision", "create the federation's CA, server certificate, per-site auth keys, server.yaml and sites/<site>.yaml"),
    "server": ("server.daemon", "run the aggregation server: SuperLink (TLS, node auth, database) + the configured federation"),
    "client": ("client.daemon", "run one site's daemon: a SuperNode with the site's key, data, local state, health and metrics"),
    "predict": ("client.predict", "segment NIfTI images with a site's personalised model (latest global + its local tensors)"),
    "prepare-data": ("client.prepare", "convert per-site folders (foundation or MSD/nnU-Net imagesTr/labelsTr) to the foundation layout, RAS, common spacing"),
    "adapt": ("simulations.adapt", "build a never-trained site's model from a finished federation (average, AdaBN, SN batch average) and score it"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsite", description="Federated segmentation with site-local normalization.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})")
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"fedsite {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    return int(module.run(sub.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
