"""RESULTS.md: every reference experiment's table, network sizes and claims, under one code version.

Each section is rendered from an experiment's ``results.json`` only: the per-site
Dice table (:func:`simulations.report.dice_table`) with each row's parameter and
MAC counts (:mod:`.model_costs`), the retrained discretised UXNet beside its
supernet (:mod:`.retrain`), and the generated claims (:mod:`.claims`). The page
names the code version every experiment recorded; experiments of different
code versions are refused, never mixed on one page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .claims import claims_block
from .convergence import PLATEAU_TOLERANCE, convergence_table
from .report import GAINS_CAPTION, dice_table, holdout_table
from .site_gains import site_gains_table
from .retrain import FIXED_ARCH, Choice, is_supernet

UNKNOWN = "unknown"


class CodeVersionMismatch(ValueError):
    """Two experiments of one page ran on different code."""


@dataclass
class Retrained:
    """The derived retrain experiment of a section: its results, the architectures chosen, its command."""

    results: dict[str, Any]
    choices: list[Choice]
    command: str


@dataclass
class Section:
    """One experiment of the page."""

    results: dict[str, Any]
    header: str
    command: str
    out: Path
    costs: dict[str, tuple[int, int] | None]
    size: tuple[int, ...] | None
    retrained: Retrained | None = None
    extras: list[str] = field(default_factory=list)  # analysis files written beside the results

    @property
    def all_runs(self) -> list[dict[str, Any]]:
        return self.results["runs"] + (self.retrained.results["runs"] if self.retrained else [])


def code_version(named: dict[str, dict[str, Any]]) -> str:
    """The one code version of ``{experiment: results}``; raises naming two experiments that differ."""
    first: tuple[str, str] | None = None
    for name, results in named.items():
        version = str(results.get("code_version") or UNKNOWN)
        if first is None:
            first = (name, version)
        elif version != first[1]:
            raise CodeVersionMismatch(f"code changed during the reproduction: {first[0]} ran on code version {first[1]}, "
                                      f"{name} on {version}; run it again to redo the experiments on one code version")
    return first[1] if first else UNKNOWN


def row_kind(spec: dict[str, Any]) -> str:
    """What a row's network is, where its name alone does not say."""
    if is_supernet(spec):
        return " (supernet)"
    if spec.get("name") == "uxnet" and spec.get(FIXED_ARCH) is not None:
        return " (discretised, retrained from scratch)"
    return ""


def merged(section: Section) -> dict[str, Any]:
    """The section's results with the retrained arms' rows after the experiment's own."""
    if section.retrained is None:
        return section.results
    extra = section.retrained.results
    if list(extra["sites"]) != list(section.results["sites"]):
        raise ValueError(f"retrain sites {extra['sites']} differ from the experiment's {section.results['sites']}")
    return {**section.results, "runs": section.all_runs, "summary": {**section.results["summary"], **extra["summary"]}}


def _count(cost: tuple[int, int] | None, i: int) -> str:
    return f"{cost[i]:,}" if cost else "n/a"


def results_table(results: dict[str, Any], costs: dict[str, tuple[int, int] | None]) -> str:
    """The Dice table with each row's network kind, parameters and MACs per input."""
    specs = {r["method"]: r["model"] for r in reversed(results["runs"])}
    lines = dice_table(results).splitlines()
    out = [lines[0] + " params | MACs (per input) |", lines[1] + "---|---|"]
    for method, line in zip(results["summary"], lines[2:]):
        cost = costs.get(method)
        label = f"| {method}{row_kind(specs.get(method, {}))} |"
        out.append(label + line[len(f"| {method} |"):] + f" {_count(cost, 0)} | {_count(cost, 1)} |")
    return "\n".join(out)


def _size_note(size: tuple[int, ...] | None) -> str:
    where = f"one {'x'.join(map(str, size))} input" if size else "one input (size not known for data on disk)"
    return (f"params and MACs: the network of each row as built in the experiment, MACs for {where} "
            "(`shared_models.complexity`); a supernet counts every candidate operator.")


def render_section(section: Section) -> list[str]:
    results = merged(section)
    lines = [f"## {section.results['experiment']}", "", section.header, "", results_table(results, section.costs), "",
             _size_note(section.size), ""]
    if section.retrained:
        for choice in section.retrained.choices:
            lines += [f"{choice.note}; the supernet's own row (`{choice.arm}`) is the continuous mixture of every candidate "
                      f"operator. Architecture from `{section.out / 'architectures.json'}`; retrained by "
                      f"`{section.retrained.command}`.", ""]
    lines += [*claims_block(section.results.get("comparisons", [])), ""]
    gains = site_gains_table(results)
    lines += [GAINS_CAPTION, "", gains, ""] if gains else []
    if any(len(r.get("history", [])) > 1 for r in section.results["runs"]):
        lines += ["Convergence: mean Dice over sites [95% interval over seeds] by round; plateau = the first round from "
                  f"which the mean stays within {PLATEAU_TOLERANCE} of its final value:", "",
                  convergence_table(section.results), ""]
    if any("holdout" in r for r in section.results["runs"]):
        lines += ["Held-out site, by adaptation option:", "", holdout_table(section.results), ""]
    lines += [f"Details: `{section.out / extra}`." for extra in section.extras]
    lines += [""] if section.extras else []
    cells_s = sum(float(r.get("wall_s", 0.0)) for r in section.all_runs)
    lines += [f"Command: `{section.command}` ({len(section.all_runs)} federations, {cells_s:.0f} s of federation wall time; "
              f"report: `{section.out / 'report.md'}`)", ""]
    return lines


def render_page(sections: list[Section], version: str) -> str:
    lines = ["# Results", "",
             f"Code version `{version}`: the hash of fedsite's sources that every experiment below recorded in its "
             "`results.json` (`simulations/cell_identity.py`).", "",
             "Every table below was produced by `fedsite reproduce` (or the per-experiment command shown), "
             "on the data the experiment names; Dice is the mean foreground Dice on each site's held-out split, "
             "scored with that site's own model, mean ± std over seeds.", ""]
    total_s = 0.0
    for section in sections:
        lines += render_section(section)
        total_s += sum(float(r.get("wall_s", 0.0)) for r in section.all_runs)
    lines += [f"Federation wall time of all experiments: {total_s:.0f} s "
              "(finished federations are reused, so this counts the run that computed each one).", ""]
    return "\n".join(lines)
