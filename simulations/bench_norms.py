"""``fedsite bench-norms``: cost of each normalization relative to BatchNorm, and of DualNorm-UNet.

Two questions, each answered by a warmed-up median wall time:

* forward + backward (input and parameter gradients) of every registered norm,
  and of the DualNorm layer with a half-resolution mask, at one 2D and one 3D
  shape, divided by BatchNorm's time at the same shape;
* one training step (Adam) of DualNorm-UNet's two-pass recipe against the plain
  residual UNet of the same widths (the paper's cost is about 2x), plus the eval
  forward (pass 1 + pass 2 against one pass).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared_models.build import build_model
from shared_models.norms import build_norm, norm_names
from shared_models.norms.dualnorm import DualNormLayer

DUALNORM = "dualnorm"  # not a buildable norm (needs a mask); benchmarked with a K=2 mask


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to time (default cpu)")
    parser.add_argument("--shape-2d", type=int, nargs=4, default=[8, 32, 64, 64], metavar=("N", "C", "H", "W"))
    parser.add_argument("--shape-3d", type=int, nargs=5, default=[2, 16, 32, 32, 32], metavar=("N", "C", "D", "H", "W"))
    parser.add_argument("--norms", nargs="+", metavar="NAME", help=f"norms to time (default: all registered + {DUALNORM})")
    parser.add_argument("--unet-size", type=int, default=64, help="2D input size of the UNet step comparison (default 64)")
    parser.add_argument("--unet-batch", type=int, default=4, help="batch of the UNet step comparison (default 4)")
    parser.add_argument("--unet-channels", type=int, nargs="+", default=[16, 32, 64, 128], metavar="C")
    parser.add_argument("--skip-unet", action="store_true", help="time the norms only")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before measuring (default 3)")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls; the median is reported (default 15)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms after ``warmup`` untimed calls (device synchronized)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _norm_layer(name: str, shape: list[int]) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    channels, dims = shape[1], len(shape) - 2
    if name == DUALNORM:
        layer = DualNormLayer(channels, 2, dims)
        mask = torch.softmax(torch.randn(shape[0], 2, *[max(1, s // 2) for s in shape[2:]]), dim=1)
        return layer, lambda x: layer(x, mask.to(x.device))
    layer = build_norm(name, channels, dims)
    return layer, layer


def time_norm(name: str, shape: list[int], device: torch.device, warmup: int, repeats: int) -> float:
    """Forward + backward (w.r.t. input and parameters) of norm ``name`` in train mode, in ms."""
    layer, call = _norm_layer(name, shape)
    layer.to(device).train()
    x = torch.randn(*shape, device=device, requires_grad=True)
    grad_out = torch.randn(*shape, device=device)
    inputs = [x, *layer.parameters()]

    def step() -> None:
        torch.autograd.grad(call(x), inputs, grad_out)

    return median_ms(step, device, warmup, repeats)


def bench_norms(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    names = list(args.norms or [*norm_names(), DUALNORM])
    rows: list[dict[str, Any]] = []
    for shape in (list(args.shape_2d), list(args.shape_3d)):
        baseline = time_norm("batch", shape, device, args.warmup, args.repeats)
        for name in names:
            row: dict[str, Any] = {"norm": name, "dims": len(shape) - 2, "shape": shape}
            try:
                ms = baseline if name == "batch" else time_norm(name, shape, device, args.warmup, args.repeats)
                row.update(ms=round(ms, 3), vs_batch=round(ms / baseline, 2))
            except Exception as exc:  # one failing norm must not hide the others
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
    return rows


def _adam_step(model: nn.Module, clip_default: float | None = None) -> Callable[..., None]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(loss: torch.Tensor, clip_value: float | None = clip_default) -> None:
        loss.backward()
        if clip_value is not None:
            nn.utils.clip_grad_value_(model.parameters(), clip_value)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_unets(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Training step and eval forward of DualNorm-UNet vs the plain UNet (same widths, same data)."""
    spec = {"channels": list(args.unet_channels), "out-channels": 2}
    size, batch = args.unet_size, args.unet_batch
    images = torch.randn(batch, 1, size, size, device=device)
    labels = torch.randint(0, 2, (batch, size, size), device=device)
    plain = build_model({"name": "unet", **spec}, seed=0).to(device).train()
    dual = build_model({"name": "dualnorm_unet", **spec}, seed=0).to(device).train()
    plain_step, dual_step = _adam_step(plain), _adam_step(dual)

    def train_plain() -> None:
        plain_step(F.cross_entropy(plain(images), labels), clip_value=None)

    def train_dual() -> None:
        dual.training_step(images, labels, F.cross_entropy, dual_step)

    def infer(model: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return model(images)

        return run

    shape = [batch, 1, size, size]
    t_plain = median_ms(train_plain, device, args.warmup, args.repeats)
    t_dual = median_ms(train_dual, device, args.warmup, args.repeats)
    plain.eval(), dual.eval()
    e_plain = median_ms(infer(plain), device, args.warmup, args.repeats)
    e_dual = median_ms(infer(dual), device, args.warmup, args.repeats)
    return [
        {"what": "train step", "model": "unet", "shape": shape, "ms": round(t_plain, 3), "vs_unet": 1.0},
        {"what": "train step", "model": "dualnorm_unet", "shape": shape, "ms": round(t_dual, 3), "vs_unet": round(t_dual / t_plain, 2)},
        {"what": "eval forward", "model": "unet", "shape": shape, "ms": round(e_plain, 3), "vs_unet": 1.0},
        {"what": "eval forward", "model": "dualnorm_unet", "shape": shape, "ms": round(e_dual, 3), "vs_unet": round(e_dual / e_plain, 2)},
    ]


def _format(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    cells = [[title for _, title in columns]]
    for row in rows:
        cells.append([str(row["error"] if key == "ms" and "error" in row else row.get(key, "")) for key, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells)


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench-norms: --device cuda requested but CUDA is not available")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "norms": bench_norms(args, device),
    }
    print(f"forward+backward, train mode, median of {args.repeats} on {result['device']}")
    print(_format(result["norms"], [("norm", "norm"), ("dims", "dims"), ("shape", "shape"), ("ms", "ms"), ("vs_batch", "x batch")]))
    if not args.skip_unet:
        result["unet"] = bench_unets(args, device)
        print()
        print(_format(result["unet"], [("what", "what"), ("model", "model"), ("shape", "input"), ("ms", "ms"), ("vs_unet", "x unet")]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0 if not any("error" in row for row in result["norms"]) else 1


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="bench_norms", description=__doc__)
    add_arguments(cli)
    raise SystemExit(run(cli.parse_args()))
