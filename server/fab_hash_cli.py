"""``fedsite fab-hash``: the FAB hash a site lists in ``approved-fabs`` for this fedsite version."""

from __future__ import annotations

import argparse

from .app_bundle import installed_fab_hash


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options: the hash depends only on the installed code


def run(args: argparse.Namespace) -> int:
    del args
    print(installed_fab_hash())
    return 0
