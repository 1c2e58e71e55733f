"""PNG figures of an experiment: learning curves, per-site bars, example segmentations."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _methods(results: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in results["runs"]))


def plot_dice_per_round(results: dict[str, Any], path: Path) -> Path:
    """One panel per site: Dice after each evaluated round, one line per method (mean over seeds)."""
    sites = results["sites"]
    cols = min(len(sites), 4)
    rows = math.ceil(len(sites) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False, sharey=True)
    for ax, site in zip(axes.flat, sites):
        for method in _methods(results):
            curves: dict[int, list[float]] = {}
            for run in (r for r in results["runs"] if r["method"] == method):
                for entry in run.get("history", []):
                    if site in entry.get("dice", {}):
                        curves.setdefault(entry["round"], []).append(entry["dice"][site])
            if curves:
                xs = sorted(curves)
                ax.plot(xs, [statistics.fmean(curves[x]) for x in xs], label=method, linewidth=1.5)
        ax.set_title(site)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(sites):]:
        ax.axis("off")
    axes[0][0].set_ylabel("Dice (own model, held-out split)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Dice per round, per site (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_dice_per_site(results: dict[str, Any], path: Path) -> Path:
    """Grouped bars: final Dice per site for each method, error bars = std over seeds."""
    sites, methods = results["sites"], _methods(results)
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(sites) + 2), 3.8))
    x = np.arange(len(sites))
    for i, method in enumerate(methods):
        s = results["summary"][method]
        means = [s["per_site"][site] for site in sites]
        stds = [s.get("per_site_std", {}).get(site, 0.0) for site in sites]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=method)
    ax.set_xticks(x, sites)
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.set_title("Final Dice per site by method (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=min(len(methods), 4))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _middle_slice(array: np.ndarray) -> np.ndarray:
    """2D view of a (1, *S) array: itself in 2D, the middle axial slice in 3D."""
    a = array[0]
    return a if a.ndim == 2 else a[..., a.shape[-1] // 2]


def plot_examples(examples: dict[str, dict[str, Any]], num_classes: int, path: Path) -> Path:
    """Rows = sites; columns = image, ground truth, then each method's prediction."""
    sites = list(examples)
    methods = list(next(iter(examples.values()))["predictions"]) if examples else []
    cols = 2 + len(methods)
    fig, axes = plt.subplots(len(sites), cols, figsize=(1.9 * cols, 2.0 * len(sites)), squeeze=False)
    cmap = plt.get_cmap("viridis", num_classes)
    for r, site in enumerate(sites):
        ex = examples[site]
        panels = [("image", _middle_slice(ex["image"]), "gray", None), ("ground truth", _middle_slice(ex["label"]), cmap, num_classes - 1)]
        panels += [(m, _middle_slice(p), cmap, num_classes - 1) for m, p in ex["predictions"].items()]
        for c, (title, data, cm, vmax) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(data, cmap=cm, vmin=0 if vmax else None, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
        axes[r][0].set_ylabel(f"{site}\n{ex['case']}", fontsize=8)
    fig.suptitle("Example held-out case per site: each method's prediction with that site's own model", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
