"""Retrain a searched UXNet's discretised architecture from scratch, as its own experiment.

A supernet's Dice is that of the continuous mixture of every candidate operator,
not of the network the search found. After an experiment with a UXNet supernet
arm has finished, :func:`retrain_config` derives an ordinary experiment from it:
the same data, method, loss, rounds and seeds, with one arm per supernet arm
whose model is the discretised network (``fixed-arch``) read from that
experiment's ``architectures.json`` (:mod:`.arch_report`). Which architecture:

* the seeds agree (the same op in every block and the same inputs at every
  decoder node, in every run): that architecture, its input weights averaged
  over the runs;
* they disagree: the architecture of the lowest seed (seed 0's).

The derived experiment is run by ``fedsite simulate`` like any other, so its
cells are reused or rerun under the usual cell-identity rules: a new search
gives a new ``fixed-arch`` and with it a new cell.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from shared_models.config import to_dict
from shared_models.durable import atomic_write_text

from .experiment import Arm, ExperimentConfig

# Keys of the supernet's spec that do not apply to a discretised network.
SUPERNET_ONLY = ("search", "arch-lr", "arch-weight-decay")
FIXED_ARCH = "fixed-arch"


def is_supernet(spec: dict[str, Any]) -> bool:
    return spec.get("name") == "uxnet" and spec.get(FIXED_ARCH, spec.get("fixed_arch")) is None


def supernet_arms(cfg: ExperimentConfig) -> list[Arm]:
    """The arms of ``cfg`` that train a UXNet supernet."""
    return [a for a in cfg.all_arms if is_supernet({**cfg.model, **a.model})]


def discretised_name(label: str) -> str:
    """``uxnet-search-fedbn`` -> ``uxnet-discretised-fedbn``."""
    return label.replace("-search-", "-discretised-") if "-search-" in label else f"{label}-discretised"


@dataclass(frozen=True)
class Choice:
    """The architecture retrained for one supernet arm, and why that one."""

    arm: str
    retrained: str
    arch: dict[str, Any]
    agreed: bool
    seeds: tuple[int, ...]

    @property
    def note(self) -> str:
        if self.agreed:
            return (f"`{self.retrained}` retrains the architecture the seeds {list(self.seeds)} of `{self.arm}` agree on "
                    "(same op in every block, same inputs at every node; input weights averaged over the seeds)")
        return (f"`{self.retrained}` retrains seed {self.seeds[0]}'s architecture: the seeds {list(self.seeds)} "
                f"of `{self.arm}` disagree")


def _structure(arch: dict[str, Any]) -> tuple:
    return (tuple(sorted(arch["ops"].items())), tuple((n, tuple(sorted(w))) for n, w in sorted(arch["inputs"].items())))


def agreed_architecture(report: dict[str, Any], arm: str) -> Choice:
    """The architecture of ``arm`` in an ``architectures.json`` report (see the module docstring)."""
    runs = sorted((r for r in report["runs"] if r["method"] == arm and r["architectures"]), key=lambda r: r["seed"])
    if not runs:
        raise ValueError(f"architectures.json has no architecture of arm {arm!r}")
    archs = [s["arch"] for r in runs for s in r["architectures"].values()]
    seeds = tuple(dict.fromkeys(int(r["seed"]) for r in runs))
    if len({_structure(a) for a in archs}) > 1:
        return Choice(arm, discretised_name(arm), archs[0], False, seeds)
    inputs = {node: {src: sum(a["inputs"][node][src] for a in archs) / len(archs) for src in chosen}
              for node, chosen in archs[0]["inputs"].items()}
    return Choice(arm, discretised_name(arm), {"ops": dict(archs[0]["ops"]), "inputs": inputs}, True, seeds)


def retrain_arm(arm: Arm, arch: dict[str, Any], name: str) -> Arm:
    """The supernet arm with its model fixed to ``arch``, without the search and its schedule."""
    model = {k: v for k, v in arm.model.items() if k.replace("_", "-") not in SUPERNET_ONLY}
    return replace(arm, name=name, model={**model, FIXED_ARCH: arch}, model_schedule={})


def retrain_config(cfg: ExperimentConfig, report: dict[str, Any]) -> tuple[ExperimentConfig, list[Choice]] | None:
    """The derived ``<name>-retrain`` experiment and the choices behind it; None without a supernet arm."""
    arms = supernet_arms(cfg)
    if not arms:
        return None
    choices = [agreed_architecture(report, a.label) for a in arms]
    retrained = tuple(retrain_arm(a, c.arch, c.retrained) for a, c in zip(arms, choices))
    return replace(cfg, name=f"{cfg.name}-retrain", methods=(), arms=retrained, models=(), norms=()), choices


def write_config(cfg: ExperimentConfig, path: Path) -> Path:
    """``cfg`` as an experiment YAML that ``fedsite simulate --config`` reads back unchanged."""
    header = f"# Derived by `fedsite reproduce`: the discretised UXNet of {cfg.name.removesuffix('-retrain')} retrained from scratch.\n"
    atomic_write_text(path, header + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
