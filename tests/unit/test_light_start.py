"""Recipes, the algorithm list and recipe errors need no torch; tables are wide through a pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fedtune.algorithms.catalog import CATALOG
from fedtune.models.peft_names import _standalone_peft_type, peft_method_names

HEAVY = ("torch", "transformers", "peft")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env={**environ, **env}, timeout=120)


def test_loading_recipes_and_the_light_commands_import_no_torch():
    out = _python("""
        import json, sys
        import fedtune.config
        after_import = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
        from fedtune.config import builtin_recipes, load_recipe
        for path in builtin_recipes().values():
            load_recipe(path)
        load_recipe("default", ["federation.algorithm=fedprox", "federation.options={mu: 0.1}",
                                "adapter.method=ia3", "bench.algorithms=[fedavg, krum]",
                                "federation.compression.up.method=int8"])
        load_recipe("default", ["federation.algorithm=offsite", "adapter.method=full"])
        after_load = sorted(m for m in ("torch", "transformers", "peft", "numpy") if m in sys.modules)
        from fedtune.cli import main
        codes = [main(["recipes"]), main(["algorithms"]), main(["run", "default", "no.such=1"]),
                 main(["run", "default", "model.name=builtin:tiny", "train.lr=abc"])]
        after_cli = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
        print(json.dumps([after_import, after_load, after_cli, codes]))
    """)
    assert out.returncode == 0, out.stderr
    after_import, after_load, after_cli, codes = json.loads(out.stdout.strip().splitlines()[-1])
    assert (after_import, after_load, after_cli) == ([], [], [])
    assert codes == [0, 0, 2, 2]


def test_the_catalog_is_what_the_implementations_register():
    from fedtune.algorithms import registry

    specs = registry()
    assert sorted(specs) == sorted(CATALOG) and len(CATALOG) == 27
    for name, info in CATALOG.items():
        spec = specs[name]
        assert (spec.config, spec.summary, spec.check, spec.sum_only) == (
            info.config, info.summary, info.check, info.sum_only), name
    # the modules still offer their options models under the old names
    from fedtune.algorithms.fedavg import FedAvgConfig
    from fedtune.algorithms.fedkseed import FedKSeedConfig

    assert FedAvgConfig is CATALOG["fedavg"].config and FedKSeedConfig is CATALOG["fedkseed"].config


def test_peft_method_names_read_without_peft_are_peft_own():
    from peft import PeftType

    expected = sorted(t.lower() for t in PeftType.__members__)
    standalone = _standalone_peft_type()
    assert standalone is not None and sorted(t.lower() for t in standalone.__members__) == expected
    assert list(peft_method_names()) == expected and {"lora", "ia3", "prefix_tuning"} <= set(expected)


def test_tables_are_not_cut_to_80_columns_through_a_pipe():
    out = _python("import sys; from fedtune.cli import main; sys.exit(main(['algorithms']))")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(len(line) for line in lines) > 120
    # at 80 columns this row wraps inside every cell; wide, the summary sits beside its options
    row = next(line for line in lines if line.startswith("│ fedavg "))
    assert "weighting=examples" in row
    assert "Federated averaging of adapter updates, weighted by client examples" in row


def test_columns_from_the_environment_win():
    out = _python("import sys; from fedtune.cli import main; sys.exit(main(['algorithms']))",
                  COLUMNS="100")
    assert out.returncode == 0 and max(len(line) for line in out.stdout.splitlines()) == 100


def test_the_secure_aggregation_defaults_skipped_at_load_are_valid():
    # Without secure aggregation and with its default codec settings the codec is not built at
    # load (that would import numpy); so the defaults themselves must make a valid codec.
    from fedtune.config import SecureAggregationSection, load_recipe
    from fedtune.errors import RecipeError
    from fedtune.privacy.fixedpoint import FixedPointCodec

    d = SecureAggregationSection()
    codec = FixedPointCodec(frac_bits=d.frac_bits, clip=d.clip, max_weight=d.max_weight)
    codec.check_capacity(3)
    with pytest.raises(RecipeError, match="exceeds 2"):  # a setting given is checked, even when off
        load_recipe("default", ["federation.secure_aggregation.frac_bits=40",
                                "federation.secure_aggregation.clip=1000"])
