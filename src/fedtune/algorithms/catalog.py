"""Every algorithm by name: its module, summary, options model and recipe checks, without torch.

The catalog is what a recipe is checked against (and what `fedtune algorithms` lists); the module
named here holds the implementation, imported only when a run builds the algorithm
(`fedtune.algorithms.base.registry`). Adding an algorithm: a row here, its options model in
`options.py`, and a module that calls `register(name, build, ...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from fedtune.algorithms import options as o
from fedtune.algorithms.fedex_options import FedExConfig, check_fedex
from fedtune.errors import RecipeError


@dataclass(frozen=True)
class AlgorithmInfo:
    name: str
    module: str                    # fedtune.algorithms.<module> registers the implementation
    summary: str
    config: type[BaseModel]        # its federation.options
    # What the algorithm needs from the rest of the recipe: raise ValueError naming the key.
    check: Callable[[BaseModel, Any], None] | None = None           # (options, Recipe)
    # True when aggregate_fit uses the updates only through their weighted mean (weights by the
    # `weighting` option) and clients send nothing else: it then works with secure aggregation,
    # which hands it one update holding that mean (runtime/secure_round.py).
    sum_only: bool = False
    # Under a multi-process launch (torchrun / accelerate; runtime/launch.py): why the algorithm
    # must run as one process (refused), or why every rank runs the same steps (said once).
    one_process: str | None = None
    unsplit_ranks: str | None = None
    # Why its simulated clients cannot live in Ray actors (federation.engine: ray), if so.
    no_ray: str | None = None
    # True when the algorithm aggregates LoRA factors of different ranks (adapter.rank_per_client)
    mixed_ranks: bool = False
    # True when its clients touch the model only through the adapter slot and the local trainer
    # (no hook reads whole parameters or gradients): train.sharding: fsdp can shard it.
    fsdp: bool = False


_ZEROTH_ORDER = "estimates gradients from forward passes only"

_ROWS = [
    AlgorithmInfo("fedavg", "fedavg", "Federated averaging of adapter updates, weighted by client "
                  "examples (McMahan et al. 2017).", o.FedAvgConfig, sum_only=True, fsdp=True),
    AlgorithmInfo("fedprox", "fedprox", "FedAvg with a proximal term μ/2‖w − w_global‖² in each "
                  "client's loss (Li et al. 2020).", o.FedProxConfig, sum_only=True),
    AlgorithmInfo("fedavgm", "fedopt", "FedAvg with server momentum on the mean client update "
                  "(Hsu et al. 2019).", o.FedAvgMConfig, sum_only=True, fsdp=True),
    AlgorithmInfo("fedadam", "fedopt", "Adam as the server optimizer on the mean client update "
                  "(Reddi et al. 2021, Adaptive Federated Optimization).", o.FedAdamConfig,
                  sum_only=True, fsdp=True),
    AlgorithmInfo("fedyogi", "fedopt", "Yogi as the server optimizer on the mean client update "
                  "(Reddi et al. 2021, Adaptive Federated Optimization).", o.FedAdamConfig,
                  sum_only=True, fsdp=True),
    AlgorithmInfo("fedadagrad", "fedopt", "Adagrad with momentum as the server optimizer (Reddi "
                  "et al. 2021, Adaptive Federated Optimization).", o.FedAdagradConfig,
                  sum_only=True, fsdp=True),
    AlgorithmInfo("scaffold", "scaffold", "SCAFFOLD: client and server control variates correct "
                  "client drift (Karimireddy et al. 2020).", o.ScaffoldConfig),
    AlgorithmInfo("dp_fedavg", "dp_fedavg", "FedAvg with client-level differential privacy: "
                  "clipped updates, Gaussian noise, RDP accountant (McMahan et al. 2018).",
                  o.DPFedAvgConfig),
    AlgorithmInfo("flexlora", "flexlora", "LoRA-aware FedAvg: average the products B·A, "
                  "re-factorise by truncated SVD (FlexLoRA, Bai et al. 2024).", o.FlexLoRAConfig,
                  mixed_ranks=True),
    AlgorithmInfo("fedsp", "fedsp", "FedSP: clients tune a small auxiliary model built from the "
                  "server's LLM; only prefix soft prompts travel (Dong et al. 2023).", o.FedSPConfig,
                  check=o.check_fedsp,
                  one_process="the auxiliary model is distilled and the prompts tuned in one "
                              "process; launch it without torchrun/accelerate",
                  no_ray="the clients take the auxiliary model the server's party distils and "
                         "keeps with the run; actors would each distil their own"),
    AlgorithmInfo("flora", "flora", "Stacked LoRA factors: the exact sum of the clients' products at "
                  "any mix of ranks, merged into a global delta (FLoRA, Wang et al. 2024).",
                  o.FLoRAConfig, check=o.check_mixed_ranks, mixed_ranks=True),
    AlgorithmInfo("hetlora", "hetlora", "Heterogeneous LoRA ranks: zero-pad to the largest, "
                  "norm-weighted average, self-pruning (HetLoRA, Cho et al. 2024).", o.HetLoRAConfig,
                  check=o.check_mixed_ranks, mixed_ranks=True),
    AlgorithmInfo("median", "robust", "Coordinate-wise median of the client updates (Yin et al. "
                  "2018, Byzantine-robust distributed learning).", o.MedianConfig, fsdp=True),
    AlgorithmInfo("trimmed_mean", "robust", "Coordinate-wise trimmed mean of the client updates "
                  "(Yin et al. 2018, Byzantine-robust distributed learning).", o.TrimmedMeanConfig, fsdp=True),
    AlgorithmInfo("krum", "robust", "(Multi-)Krum: keep the updates closest to their neighbours "
                  "(Blanchard et al. 2017, Machine learning with adversaries).", o.KrumConfig, fsdp=True),
    AlgorithmInfo("norm_bounding", "robust", "Clip each client update to a maximum L2 norm, then "
                  "average (Sun et al. 2019, Can you really backdoor FL?).", o.NormBoundingConfig, fsdp=True),
    AlgorithmInfo("fedmezo", "fedmezo", "MeZO zeroth-order local steps on the adapter, FedAvg, "
                  "personalised client learning rates (arXiv 2402.05926).", o.FedMeZOConfig,
                  check=o.check_zeroth_order, unsplit_ranks=_ZEROTH_ORDER),
    AlgorithmInfo("fedkseed", "fedkseed", "Zeroth-order full-parameter tuning over K shared seeds; "
                  "only K scalars travel (arXiv 2312.06353; pro: FedKSeed-Pro).", o.FedKSeedConfig,
                  # the pool moves by the weighted mean of the clients' K scalars (FedKSeed-Pro
                  # needs each client's own: check_fedkseed refuses it with secure aggregation)
                  check=o.check_fedkseed, sum_only=True, unsplit_ranks=_ZEROTH_ORDER),
    AlgorithmInfo("offsite", "offsite", "Offsite-tuning: clients tune the end layers of a "
                  "layer-dropped emulator, the server plugs them into the full model.",
                  o.OffsiteConfig, check=o.check_offsite, sum_only=True,
                  one_process="the emulator is distilled and trained in one process; launch it "
                              "without torchrun/accelerate",
                  no_ray="the clients train the emulator the server's party distils and keeps "
                         "with the run; actors would each distil their own"),
    AlgorithmInfo("fedex", "fedex", "FedEx: each client's local hyper-parameters drawn from a "
                  "distribution over a grid that the server moves by exponentiated gradient on "
                  "validation losses, around a base algorithm (Khodak et al. 2021).", FedExConfig,
                  check=check_fedex),
    # personalised FL (docs/algorithms.md, "Personalised FL"); what travels is summed, so each
    # works with secure aggregation; personal tensors never leave the client
    AlgorithmInfo("fedavg_ft", "fedavg_ft", "FedAvg + FT: each client fine-tunes a copy of the "
                  "global adapter before it evaluates (the pFL-Bench -FT baseline).",
                  o.FedAvgFTConfig, sum_only=True),
    AlgorithmInfo("ditto", "ditto", "Ditto: a personal adapter per client with a proximal pull "
                  "λ towards the global one (Li et al. 2021).", o.DittoConfig, sum_only=True),
    AlgorithmInfo("fedrep", "fedrep", "FedRep-style partial sharing: personal adapter part "
                  "(top layers) and shared part trained in alternation (Collins et al. 2021).",
                  o.FedRepConfig, sum_only=True),
    AlgorithmInfo("fedsa_lora", "fedsa_lora", "FedSA-LoRA: share and average LoRA A, keep B "
                  "per client (Guo et al. 2025).", o.LoraSplitConfig, check=o.check_lora_split,
                  sum_only=True),
    AlgorithmInfo("ffa_lora", "ffa_lora", "FFA-LoRA: freeze LoRA A at its seeded initial "
                  "values, train and share B only (Sun et al. 2024).", o.LoraSplitConfig,
                  check=o.check_lora_split, sum_only=True),
    AlgorithmInfo("pfedme", "pfedme", "pFedMe: personal adapters via Moreau envelopes, K inner "
                  "steps per batch, server mixing β (T. Dinh et al. 2020).", o.PFedMeConfig,
                  sum_only=True),
    AlgorithmInfo("pfedgate", "pfedgate", "pFedGate on LoRA: a per-client gating layer keeps a "
                  "sparse, scaled subset of the shared adapter's modules under a budget (Chen et "
                  "al. 2023).", o.PFedGateConfig, check=o.check_pfedgate, sum_only=True,
                  unsplit_ranks="its gated model trains whole batches in each process"),
]

CATALOG: dict[str, AlgorithmInfo] = {row.name: row for row in _ROWS}


def available_algorithms() -> list[str]:
    return sorted(CATALOG)


def algorithm_options(name: str, options: dict) -> BaseModel:
    """Validate `federation.options` against the algorithm's options model."""
    info = CATALOG[name]
    try:
        return info.config.model_validate(options)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = "federation.options." + ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{key}: {msg}")
        allowed = ", ".join(info.config.model_fields) or "(none)"
        raise RecipeError(f"{'; '.join(lines)} (options of {name}: {allowed})") from None


def check_recipe(recipe: Any) -> None:
    """Raise ValueError where the recipe's other sections do not suit its algorithm."""
    fed = recipe.federation
    info = CATALOG[fed.algorithm]
    if info.check is not None:
        info.check(algorithm_options(fed.algorithm, fed.options), recipe)
