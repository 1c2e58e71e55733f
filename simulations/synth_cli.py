"""``fedsite synth``: write the synthetic domain-shift dataset to a folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from .domain_shift import DEFAULT_PROFILES, generate_dataset
from .site_profiles import site_profiles


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder to write DIR/<site>/images|labels into")
    parser.add_argument("--sites", type=int, default=len(DEFAULT_PROFILES), help="number of sites: site-a..site-d are the reference scanners, more sites get jittered copies")
    parser.add_argument("--cases-per-site", type=int, default=40)
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--size", type=int, nargs="+", help="image size, e.g. 64 64 or 32 32 32")
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    root = generate_dataset(
        args.out,
        profiles=site_profiles(args.sites),
        cases_per_site=args.cases_per_site,
        spatial_dims=args.spatial_dims,
        size=tuple(args.size) if args.size else None,
        num_classes=args.num_classes,
        seed=args.seed,
    )
    print(f"wrote {args.sites} sites x {args.cases_per_site} cases to {root}")
    return 0
