"""The one-page ``report.md``: configuration, command, tables, figures of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from client.data import load_site
from client.trainer import predict_labels
from shared_models.config import to_dict
from shared_models.durable import atomic_write_text

from .cells import Cell
from .experiment import DataConfig, ExperimentConfig
from .convergence import PLATEAU_TOLERANCE, convergence_table, plot_convergence
from .plots import plot_dice_per_round, plot_dice_per_site, plot_examples
from .report import detail_table, dice_table
from .site_gains import site_gains_table


def collect_examples(out: Path, results: dict[str, Any], root: Path, data: DataConfig) -> dict[str, dict[str, Any]]:
    """First held-out case of each site, predicted by each method's first-seed model."""
    first_seed: dict[str, str] = {}
    for run in results["runs"]:
        first_seed.setdefault(run["method"], f"{run['method']}-seed{run['seed']}")
    examples: dict[str, dict[str, Any]] = {}
    trained = {site for run in results["runs"] for site in run.get("per_site", {})}
    for site in (s for s in results["sites"] if s in trained):  # a site left out of every federation has no model
        site_data = load_site(root / site, test_fraction=data.test_fraction, split_seed=data.split_seed,
                              num_classes=results["num_classes"], intensity=data.intensity)
        if not site_data.test:
            continue
        case = site_data.test[0]
        image = torch.from_numpy(np.array(case.image[None], dtype=np.float32))
        predictions = {}
        for method, cell_name in first_seed.items():
            model = Cell(out / "runs" / cell_name).personalised_model(site)
            predictions[method] = predict_labels(model, image, torch.device("cpu"))[0].numpy()
        examples[site] = {"case": case.name, "image": case.image, "label": case.label, "predictions": predictions}
    return examples


def write_report_page(out: Path, results: dict[str, Any], cfg: ExperimentConfig, data: DataConfig, root: Path) -> Path:
    """Figures + ``report.md`` tying them to the configuration and the command."""
    figures = [
        ("dice_per_round.png", "Dice of each site's own model after each round (mean over seeds), one line per method.",
         lambda p: plot_dice_per_round(results, p)),
        ("convergence.png", "Mean Dice over sites against rounds and against the rounds' wall time (mean over seeds, "
         "band: 95% interval over seeds).", lambda p: plot_convergence(results, p)),
        ("dice_per_site.png", "Final Dice per site by method; error bars are the standard deviation over seeds.",
         lambda p: plot_dice_per_site(results, p)),
        ("examples.png", "One held-out case per site: image, ground truth, and each method's prediction (first seed).",
         lambda p: plot_examples(collect_examples(out, results, root, data), results["num_classes"], p)),
    ]
    lines = [f"# Report: {results['experiment']}", ""]
    if results.get("command"):
        lines += ["Produced by:", "", f"    {results['command']}", ""]
    lines += [
        f"{len(results['sites'])} sites ({', '.join(results['sites'])}), {results['num_classes']} classes; "
        f"{len(results['summary'])} methods x {len(next(iter(results['summary'].values()))['seeds'])} seeds; "
        f"total wall time {results.get('wall_s', 0):.0f} s.",
        "",
        "## Dice per site (each site scored with its own model on its held-out split)",
        "",
        dice_table(results),
        "",
        *(["## Gain over local training at each site (mean over seeds of the paired difference in Dice)", "",
           site_gains_table(results), ""] if site_gains_table(results) else []),
        "## Dice (mean ± std over seeds) and HD95 (mm) per site",
        "",
        detail_table(results),
        "",
        "## Convergence (mean Dice over sites [95% interval over seeds] by round)",
        "",
        convergence_table(results),
        "",
        f"Plateau round: the first round from which the mean stays within {PLATEAU_TOLERANCE} of its final value.",
        "",
        "## Figures",
        "",
    ]
    for name, caption, draw in figures:
        draw(out / name)
        lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    if any("holdout" in r for r in results["runs"]):
        from .report import holdout_table

        lines += ["## A site that never trained", "", "Dice of the held-out site's model built by each adaptation option:", "",
                  holdout_table(results), ""]
    for extra, title in (("sn_weights.md", "Switchable Norm: IN/LN/BN weights per site"), ("architectures.md", "UXNet architectures found")):
        if (out / extra).exists():
            lines += [f"- {title}: [{extra}]({extra})"]
    lines += ["", "## Configuration", "", "```yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "```", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
