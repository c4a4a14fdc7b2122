"""The Recipe: one typed, validated description of a run, loaded from YAML plus key=value overrides.

Three jobs, three modules: `schema` (the sections), `loading` (YAML, overrides, errors that name
file, line and key) and `checks` (what components check in the sections they read). Each
component receives only its own section; a wrong key or value fails at load time.
"""

from fedtune.config.loading import (
    builtin_recipes,
    load_recipe,
    parse_override,
    split_recipe_args,
)
from fedtune.config.schema import (
    EVAL_METRICS,
    FEDTUNE_METHODS,
    LOSS_METRICS,
    AdapterSection,
    AttackSection,
    BenchAlgorithm,
    BenchSection,
    CodecSection,
    CompressionSection,
    DataSection,
    DPSGDSection,
    EarlyStoppingSection,
    EvalSection,
    FederationSection,
    HumanEvalSection,
    MlflowSection,
    ModelSection,
    OutputSection,
    Recipe,
    RetrySection,
    Section,
    SecureAggregationSection,
    SplitSection,
    SyntheticSection,
    TlsSection,
    TrainSection,
    TransportSection,
    normal_method,
)

__all__ = [
    "EVAL_METRICS", "FEDTUNE_METHODS", "LOSS_METRICS", "AdapterSection", "AttackSection",
    "BenchAlgorithm", "BenchSection", "CodecSection", "CompressionSection", "DPSGDSection",
    "DataSection", "EarlyStoppingSection", "EvalSection", "FederationSection", "HumanEvalSection",
    "MlflowSection", "ModelSection", "OutputSection", "Recipe", "RetrySection",
    "SecureAggregationSection", "Section", "SplitSection", "SyntheticSection", "TlsSection",
    "TrainSection", "TransportSection", "builtin_recipes", "load_recipe", "normal_method",
    "parse_override", "split_recipe_args",
]
