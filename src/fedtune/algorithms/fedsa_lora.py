"""FedSA-LoRA (Guo et al. 2025): LoRA's A matrices are shared and averaged, each client keeps its
own B matrices (client-specific knowledge). A and B train jointly; only A travels. Each client's B
lives in its persistent state and is restored for its turn on the shared model, unlike
FederatedScope's shared-model mode where "local" B is one tensor trained by the clients in turn.
The global model is the averaged A with the initial (zero) B: only the personal models are
meaningful to evaluate."""

from __future__ import annotations

from fedtune.algorithms.base import register
from fedtune.algorithms.fedavg import FedAvg, FedAvgConfig
from fedtune.algorithms.fedrep import SplitLocal
from fedtune.algorithms.personal import PartialView, check_split, matching

LORA_B = ["lora_B"]


def lora_b_names(names: list[str]) -> set[str]:
    chosen = matching(names, LORA_B)
    check_split(chosen, names, "adapter (fedsa_lora: LoRA B tensors)")
    return chosen


SPEC = register(
    "fedsa_lora", lambda config: FedAvg(FedAvgConfig(weighting=config.weighting)),
    local=lambda config: SplitLocal(lora_b_names, alternate=False),
    view=lambda config, slot: PartialView(slot, lora_b_names(list(slot.params))))
