"""UXNet-style searched multi-level feature aggregation (Ji et al., arXiv:2009.07501).

Verified from the abstract only (methods.md §5.2): an encoder-decoder search space
over (i) which scales feed each decoder node and (ii) block-wise operators, relaxed
continuously and searched with a DARTS-style method. The concrete space here is
our reconstruction (methods.md §5.3, **[UNVERIFIED]**); check against the paper:

* candidate operators: see :mod:`.uxnet_ops` (list is a guess);
* one searchable block per level (``blocks_per_level``) after a fixed
  max-pool + conv-norm-ReLU downsampling; no residual around a mixed op;
* decoder node at level l: ``h_l = sum_j softmax(beta_l)_j R_j(f_j)`` over *all*
  encoder levels and every coarser decoder node, ``R`` = 1x1 conv + linear resize
  (up) or adaptive average pooling (down), then the node's searchable block(s);
* first-order DARTS (alpha/beta on a validation batch, weights on a training batch);
  inside federated local training (:meth:`UXNet.search_training_step`) each
  batch is split in two halves: alpha/beta on one (own Adam, ``arch-lr``), the
  weights on the other (the trainer's optimizer). The paper's split (a held-out
  set vs. the training set) is **[UNVERIFIED]**;
* discretisation: arg-max operator per block, top-k inputs per node (``top_k``,
  default 2) combined with the softmax weights renormalised over the kept inputs.
  The paper may instead sum the kept inputs or relearn their weights; the weights
  travel in the architecture dict, so set them to 1.0 for a plain sum.

The same class builds the supernet (``fixed_arch=None``) and the discretised net
(``fixed_arch=<dict from discretize/architecture_summary>``); module paths are
identical, so supernet weights load into the discretised net by key.

**Federated learning.** alpha (``...alpha``) and beta (``...beta``) are plain
parameters outside any norm module, so :func:`shared_models.partition.partition`
classifies them as ordinary weights: *shared* (averaged) under fedavg/fedbn/silobn
and local only under ``local``. Decision: under the shared policies the
federation searches **one** architecture -- each site takes first-order DARTS
steps on alpha/beta with its own data during local training, and FedAvg
averages alpha/beta like any weight (averaging logits, not softmax weights).
A per-site search is the ``local`` policy (every tensor stays at its site);
keeping only alpha/beta local while sharing the weights is not offered
(policy overrides act on norm roles, and alpha/beta have none).
:func:`architecture_summary` reports what each site or the federation found;
``simulations/arch_report.py`` does so for finished simulations.

The architecture optimizer (Adam over alpha/beta) is a plain attribute, not a
module: the state_dict and the fingerprint are those of the supernet, and it is
rebuilt with the model every round (its moments do not survive a round, like the
trainer's weight optimizer). ``search: false`` freezes alpha/beta
(``requires_grad`` off): the supernet's weights train under a fixed mixture, e.g.
a warm-up via ``model-schedule: {6: {search: true}}``. A searching supernet owns
``training_step``, so SelfReg (which attaches its own) is refused for it; it is
available for ``search: false`` and for the discretised net.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Pool
from torch import nn

from ..norms import build_norm
from .blocks import UShapeConfig, conv
from .registry import register_model
from .uxnet_ops import DEFAULT_OPS, build_op

__all__ = [
    "UXNet",
    "UXNetConfig",
    "arch_parameters",
    "weight_parameters",
]


@dataclass(frozen=True)
class UXNetConfig(UShapeConfig):
    """Hyper-parameters of :class:`UXNet` (YAML keys in kebab-case).

    ``ops`` None means the default candidates for ``spatial_dims``; ``fixed_arch``
    None builds the supernet, a dict builds the discretised network.
    """

    ops: tuple[str, ...] | None = None
    blocks_per_level: int = 1
    top_k: int = 2
    # A plain top-k may drop a node's next-coarser input, leaving that decoder node
    # dead after discretisation; True always keeps it. [UNVERIFIED: the paper's rule]
    keep_decoder_chain: bool = False
    fixed_arch: dict[str, Any] | None = None
    search: bool = True  # supernet only: DARTS steps on alpha/beta in training_step; False freezes them
    arch_lr: float = 3e-3  # Adam lr of alpha/beta (DARTS uses 3e-4 over many more steps)
    arch_weight_decay: float = 1e-3  # DARTS' architecture weight decay

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blocks_per_level < 1 or self.top_k < 1:
            raise ValueError("blocks-per-level and top-k must be >= 1")
        if self.arch_lr < 0 or self.arch_weight_decay < 0:
            raise ValueError("arch-lr and arch-weight-decay must be >= 0")
        if self.ops is not None and len(self.ops) < 1:
            raise ValueError("ops must list at least one operator")
        if self.fixed_arch is not None:
            _check_arch(self.fixed_arch, self)

    @property
    def candidate_ops(self) -> tuple[str, ...]:
        return tuple(self.ops) if self.ops is not None else DEFAULT_OPS[self.spatial_dims]


class SearchBlock(nn.Module):
    """Mixed operator ``sum_o softmax(alpha)_o * o(x)``; a single operator once discretised."""

    def __init__(self, names: Sequence[str], spatial_dims: int, channels: int, norm: str, norm_options: dict[str, Any], searchable: bool):
        super().__init__()
        self.ops = nn.ModuleDict({n: build_op(n, spatial_dims, channels, norm, norm_options) for n in names})
        self.alpha = nn.Parameter(torch.zeros(len(names))) if searchable else None

    def op_weights(self) -> torch.Tensor:
        if self.alpha is None:
            return torch.ones(len(self.ops))
        return torch.softmax(self.alpha, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.alpha is None:
            return sum(op(x) for op in self.ops.values())  # exactly one op once discretised
        weights = self.op_weights()
        return sum(w * op(x) for w, op in zip(weights, self.ops.values()))


class Resample(nn.Module):
    """R_{j->l}: 1x1 conv to the node width and resize to the node's size (cheaper side first)."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, source_level: int, target_level: int):
        super().__init__()
        self.proj = conv(spatial_dims, in_ch, out_ch, kernel=1)
        self.direction = (source_level > target_level) - (source_level < target_level)
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self.pool = F.adaptive_avg_pool2d if spatial_dims == 2 else F.adaptive_avg_pool3d

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if self.direction > 0:
            return F.interpolate(self.proj(x), size=tuple(size), mode=self.mode, align_corners=False)
        if self.direction < 0:
            return self.proj(self.pool(x, tuple(size)))
        return self.proj(x)


class EncoderLevel(nn.Module):
    """Fixed downsampling (levels >= 1) followed by searchable blocks."""

    def __init__(self, cfg: UXNetConfig, level: int, block_ops: Sequence[Sequence[str]], searchable: bool):
        super().__init__()
        dims, widths = cfg.spatial_dims, cfg.channels
        self.down: nn.Module
        if level == 0:
            self.down = nn.Identity()
        else:
            self.down = nn.Sequential(
                Pool[Pool.MAX, dims](kernel_size=2),
                conv(dims, widths[level - 1], widths[level], bias=False),
                build_norm(cfg.norm, widths[level], dims, **cfg.norm_options),
                nn.ReLU(),
            )
        self.blocks = nn.Sequential(
            *(SearchBlock(names, dims, widths[level], cfg.norm, cfg.norm_options, searchable) for names in block_ops)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.down(x))


class DecoderNode(nn.Module):
    """Aggregate resampled features of several scales (softmax(beta) weights), then searchable blocks."""

    def __init__(
        self,
        cfg: UXNetConfig,
        level: int,
        sources: Mapping[str, float],
        block_ops: Sequence[Sequence[str]],
        searchable: bool,
    ):
        super().__init__()
        dims, widths = cfg.spatial_dims, cfg.channels
        self.level = level
        self.inputs = nn.ModuleDict(
            {s: Resample(dims, widths[_source_level(s)], widths[level], _source_level(s), level) for s in sources}
        )
        self.beta = nn.Parameter(torch.zeros(len(sources))) if searchable else None
        self.register_buffer("fixed_weights", torch.tensor(list(sources.values()), dtype=torch.float32), persistent=False)
        self.blocks = nn.Sequential(
            *(SearchBlock(names, dims, widths[level], cfg.norm, cfg.norm_options, searchable) for names in block_ops)
        )

    def input_weights(self) -> torch.Tensor:
        return torch.softmax(self.beta, dim=0) if self.beta is not None else self.fixed_weights

    def forward(self, features: Mapping[str, torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        weights = self.input_weights()
        h = sum(w * r(features[s], size) for w, (s, r) in zip(weights, self.inputs.items()))
        return self.blocks(h)


def _source_level(source: str) -> int:
    return int(source[1:])


def candidate_sources(levels: int, level: int) -> list[str]:
    """Inputs a decoder node at ``level`` may use: every encoder level, every coarser decoder node.

    The U-Net pair (same-level encoder, next coarser feature) comes first, so that
    ties (e.g. an untrained supernet) discretise to a plain U-Net.
    """
    coarser = f"d{level + 1}" if level + 1 <= levels - 2 else f"e{levels - 1}"
    every = [f"e{j}" for j in range(levels)] + [f"d{j}" for j in range(levels - 2, level, -1)]
    return [f"e{level}", coarser, *(s for s in every if s not in (f"e{level}", coarser))]


class UXNet(nn.Module):
    """Searchable (or discretised) U-shaped network with all-scale decoder aggregation."""

    def __init__(self, cfg: UXNetConfig):
        super().__init__()
        self.config = cfg
        dims, widths, levels = cfg.spatial_dims, cfg.channels, len(cfg.channels)
        arch = cfg.fixed_arch
        searchable = arch is None
        ops = cfg.candidate_ops

        def block_ops(prefix: str) -> list[list[str]]:
            if arch is None:
                return [list(ops)] * cfg.blocks_per_level
            return [[arch["ops"][f"{prefix}.blocks.{b}"]] for b in range(cfg.blocks_per_level)]

        self.stem = conv(dims, cfg.in_channels, widths[0])
        self.encoder = nn.ModuleList(EncoderLevel(cfg, lv, block_ops(f"encoder.{lv}"), searchable) for lv in range(levels))
        nodes = []
        for i, lv in enumerate(range(levels - 2, -1, -1)):
            name = f"decoder.{i}"
            sources = {s: 1.0 for s in candidate_sources(levels, lv)} if arch is None else dict(arch["inputs"][name])
            nodes.append(DecoderNode(cfg, lv, sources, block_ops(name), searchable))
        self.decoder = nn.ModuleList(nodes)
        self.head = conv(dims, widths[0], cfg.out_channels, kernel=1)
        if searchable and cfg.search:
            # instance attribute, not a method: the trainer's hook exists only while searching
            self.training_step = self.search_training_step
        elif searchable:
            for p in arch_parameters(self):
                p.requires_grad_(False)

    @property
    def is_supernet(self) -> bool:
        return self.config.fixed_arch is None

    def _arch_optimizer(self, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam over alpha/beta, created on first use; kept out of the module tree."""
        opt = self.__dict__.get("_arch_opt")
        if opt is None or [id(p) for g in opt.param_groups for p in g["params"]] != [id(p) for p in params]:
            opt = torch.optim.Adam(params, lr=self.config.arch_lr, betas=(0.5, 0.999), weight_decay=self.config.arch_weight_decay)
            self.__dict__["_arch_opt"] = opt
        return opt

    def search_training_step(self, images: torch.Tensor, labels: torch.Tensor, loss_fn: Callable[..., torch.Tensor], step: Callable[..., None]) -> torch.Tensor:
        """First-order DARTS on one batch (the trainer's ``training_step`` hook while searching).

        The batch is split in two halves. On the second half alpha/beta take one step
        of their own Adam (gradients w.r.t. alpha/beta only, no weight gradient is
        touched). On the first half the weights take ``step(loss)`` (the trainer's
        backward + optimizer step) with alpha/beta's ``requires_grad`` off, so they
        get no gradient and the trainer's Adam -- which skips parameters whose
        ``.grad`` is None, weight decay included -- leaves them alone. A batch of
        one sample serves both updates. Returns the detached weight-half loss.
        """
        arch = arch_parameters(self)
        n = images.shape[0]
        half = (n + 1) // 2
        if n >= 2:
            (wx, wy), (ax, ay) = (images[:half], labels[:half]), (images[half:], labels[half:])
        else:
            (wx, wy) = (ax, ay) = (images, labels)
        opt = self._arch_optimizer(arch)
        opt.zero_grad(set_to_none=True)
        set_grads(loss_fn(self(ax), ay), arch)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for p in arch:
            p.requires_grad_(False)
        try:
            loss = loss_fn(self(wx), wy)
            step(loss)
        finally:
            for p in arch:
                p.requires_grad_(True)
        return loss.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: dict[str, torch.Tensor] = {}
        h = self.stem(x)
        for lv, level in enumerate(self.encoder):
            h = level(h)
            features[f"e{lv}"] = h
        for node in self.decoder:
            h = node(features, features[f"e{node.level}"].shape[2:])
            features[f"d{node.level}"] = h
        return self.head(h)

    def selfreg_features(self) -> tuple[list[nn.Module], list[nn.Module], nn.Module]:
        """SelfReg taps: encoder levels 1.., decoder nodes but the last, the last node (teacher)."""
        return list(self.encoder[1:]), list(self.decoder[:-1]), self.decoder[-1]


def _check_arch(arch: Mapping[str, Any], cfg: UXNetConfig) -> None:
    """Fail early, naming the key, if a saved architecture does not fit ``cfg``."""
    if not isinstance(arch, Mapping) or set(arch) - {"ops", "inputs"} or not {"ops", "inputs"} <= set(arch):
        raise ValueError("fixed-arch must be a mapping with exactly the keys 'ops' and 'inputs'")
    levels = len(cfg.channels)
    blocks = [f"encoder.{lv}.blocks.{b}" for lv in range(levels) for b in range(cfg.blocks_per_level)]
    blocks += [f"decoder.{i}.blocks.{b}" for i in range(levels - 1) for b in range(cfg.blocks_per_level)]
    if set(arch["ops"]) != set(blocks):
        raise ValueError(f"fixed-arch.ops: expected blocks {blocks}, got {sorted(arch['ops'])}")
    for name, op in arch["ops"].items():
        if op not in cfg.candidate_ops:
            raise ValueError(f"fixed-arch.ops.{name}: {op!r} is not a candidate ({', '.join(cfg.candidate_ops)})")
    nodes = [f"decoder.{i}" for i in range(levels - 1)]
    if set(arch["inputs"]) != set(nodes):
        raise ValueError(f"fixed-arch.inputs: expected nodes {nodes}, got {sorted(arch['inputs'])}")
    for i, name in enumerate(nodes):
        allowed = candidate_sources(levels, levels - 2 - i)
        chosen = arch["inputs"][name]
        if not isinstance(chosen, Mapping) or not chosen or set(chosen) - set(allowed):
            raise ValueError(f"fixed-arch.inputs.{name}: expected a non-empty mapping over {allowed}, got {chosen!r}")


# ----------------------------------------------------------------- search helpers
def search_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (SearchBlock, DecoderNode))]


def arch_parameters(model: nn.Module) -> list[nn.Parameter]:
    """alpha of every mixed op and beta of every decoder node (empty once discretised)."""
    params = []
    for _, m in search_modules(model):
        p = m.alpha if isinstance(m, SearchBlock) else m.beta
        if p is not None:
            params.append(p)
    return params


def weight_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter that is not an architecture parameter."""
    arch = {id(p) for p in arch_parameters(model)}
    return [p for p in model.parameters() if id(p) not in arch]


def set_grads(loss: torch.Tensor, params: Sequence[nn.Parameter]) -> None:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads):
        p.grad = g



@register_model("uxnet", UXNetConfig, "UXNet-style searchable all-scale aggregation supernet (fixed-arch: discretised)")
def build_uxnet(cfg: UXNetConfig) -> nn.Module:
    return UXNet(cfg)
