"""Federated methods of the experiments: a name -> (policy, strategy, options).

Methods are named as in the FL papers; ``pooled`` is the centralised upper
reference (one node trains on every site's training split, every site is scored
with that single model) and ``local`` the no-collaboration baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: share of the epoch budget the ``-ft`` methods spend fine-tuning at the site after federating
FINETUNE_SHARE = 0.2
#: Ditto's lambda (Li et al. 2021 tune it in 0.05-2); weight of (lambda/2)||v - w||^2 against the Dice-CE loss
DITTO_MU = 0.1


@dataclass(frozen=True)
class Method:
    """How one experiment arm federates."""

    policy: str
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    pooled: bool = False
    policy_overrides: dict[str, str] = field(default_factory=dict)
    strategy_options: dict[str, Any] = field(default_factory=dict)
    finetune: bool = False  # the last FINETUNE_SHARE of the epochs: every tensor fine-tuned at the site
    personal_mu: float = 0.0  # Ditto: each site also trains a personal model pulled toward the global one
    description: str = ""


METHODS: dict[str, Method] = {
    "local": Method("local", description="each site trains alone; nothing is shared"),
    "fedavg": Method("fedavg", description="every tensor averaged, norm statistics included"),
    "fedprox": Method("fedavg", "fedprox", proximal_mu=0.01, strategy_options={"proximal_mu": 0.01}, description="FedAvg + proximal term"),
    "fedadam": Method("fedavg", "fedadam", description="server-side Adam on the averaged update"),
    "fedyogi": Method("fedavg", "fedyogi", description="server-side Yogi on the averaged update"),
    "fedavgm": Method("fedavg", "fedavgm", description="server-side momentum on the averaged update"),
    "fedbn": Method("fedbn", description="every norm-layer tensor stays at its site"),
    "fedbn-avgm": Method("fedbn", "fedavgm", description="FedBN with server-side momentum on the shared tensors"),
    "fedbn-adam": Method("fedbn", "fedadam", description="FedBN with server-side Adam on the shared tensors"),
    "silobn": Method("silobn", description="norm statistics stay at the site, affine shared"),
    "fedbn-stem": Method("fedbn", policy_overrides={"stem": "local"},
                         description="FedBN and the input convolution stays at the site (PartialFed, LG-FedAvg)"),
    "fedper": Method("fedbn", policy_overrides={"head": "local"},
                     description="FedBN and the output convolution stays at the site (FedPer's local head)"),
    "fedbn-ft": Method("fedbn", finetune=True,
                       description="FedBN, then every site fine-tunes the whole model on its own data"),
    "fedavg-ft": Method("fedavg", finetune=True,
                        description="FedAvg, then every site fine-tunes the whole model on its own data"),
    "ditto": Method("fedbn", personal_mu=DITTO_MU,
                    description="Ditto: FedBN's global model, and a personal model per site pulled toward it (scored)"),
    "pooled": Method("fedavg", pooled=True, description="centralised training on all sites' data"),
}


def finetune_budget(method: Method, rounds: int, local_epochs: int) -> tuple[int, int]:
    """(federated rounds, fine-tuning epochs) of a method within ``rounds`` x ``local_epochs`` epochs.

    A fine-tuning method trains as long as every other method: it federates for the
    first rounds and spends the last ``FINETUNE_SHARE`` of the rounds' epochs at the
    site, so a gain over ``local`` is not bought with extra training.
    """
    if not method.finetune or rounds < 2:
        return rounds, 0
    at_site = min(rounds - 1, max(1, round(rounds * FINETUNE_SHARE)))
    return rounds - at_site, at_site * local_epochs
