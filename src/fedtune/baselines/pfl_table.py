"""The bench's pFL-Bench table: per variant, the clients' figures summarised as pFL-Bench does
(example-weighted mean, std across clients, bottom 10 %) for the global model and the personal
one (the model each client evaluates: its personal model where the method has one, else the
global), the unseen (holdout) clients' adapted figures, and the bytes per round."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from fedtune.baselines.results import VariantResult, _fmt
from fedtune.baselines.variants import LOCAL_MEAN
from fedtune.track.pfl import summarise

STATS = ("mean", "std", "bottom_10")


def variant_pfl(r: VariantResult, holdout: Collection[str] = ()) -> dict[str, Any] | None:
    """pFL figures of a variant: the run's own (summary.json `pfl`); for the local-only mean, each
    participating client's own model on its own test part is its personal model (no global model;
    the holdout clients are left out, as they are from the federated variants' figures)."""
    if r.kind == LOCAL_MEAN:
        own = summarise(r.per_client, sorted(c for c in r.per_client if c not in holdout)).get("global")
        return {"participating": {"personal": own}} if own else None
    return r.pfl


def pfl_rows(results: list[VariantResult], rounds: int, holdout: Collection[str] = ()) -> list[dict[str, Any]]:
    """One row per federated variant (and the local-only mean): flat keys, None where absent."""
    rows = []
    for r in results:
        pfl = variant_pfl(r, holdout)
        if not pfl:
            continue
        seen = pfl.get("participating") or {}
        glob = seen.get("global") or {}
        personal = seen.get("personal") or glob   # a global-model method: the global model
        unseen = pfl.get("unseen") or {}
        adapted = unseen.get("personal") or unseen.get("global") or {}
        row: dict[str, Any] = {"variant": r.variant}
        for metric in ("exact_match", "loss"):
            row[f"global_{metric}"] = (glob.get(metric) or {}).get("mean")
            for stat in STATS:
                row[f"personal_{metric}_{stat}"] = (personal.get(metric) or {}).get(stat)
            row[f"unseen_{metric}"] = (adapted.get(metric) or {}).get("mean")
        row["backdoor_personal_mean"] = (personal.get("backdoor_success") or {}).get("mean")
        row["bytes_per_round"] = (r.bytes_up + r.bytes_down) / rounds if rounds else None
        rows.append(row)
    return rows


def pfl_markdown(results: list[VariantResult], rounds: int, holdout: Collection[str] = ()) -> str:
    """The table as markdown (empty when no variant has client figures)."""
    rows = pfl_rows(results, rounds, holdout)
    if not rows:
        return ""
    header = ["variant", "global EM", "personal EM mean", "std", "bottom 10 %", "global loss",
              "personal loss mean", "std", "bottom 10 %", "unseen EM", "unseen loss", "bytes / round"]
    lines = ["## Personalised FL (pFL-Bench summary)", "",
             "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [row["variant"], _fmt("exact_match", row["global_exact_match"])]
        cells += [_fmt("exact_match", row[f"personal_exact_match_{s}"]) for s in STATS]
        cells += [_fmt("loss", row["global_loss"])]
        cells += [_fmt("loss", row[f"personal_loss_{s}"]) for s in STATS]
        cells += [_fmt("exact_match", row["unseen_exact_match"]), _fmt("loss", row["unseen_loss"])]
        b = row["bytes_per_round"]
        cells.append("-" if b is None else f"{b:,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Client figures are over the participating clients' own test parts: weighted mean "
              "(by test examples), standard deviation across clients and the bottom 10 % (the value "
              "at position ⌊n/10⌋ of the clients sorted worst first). Personal: each client's own "
              "model (the global model for methods without one; the local-only mean: each client's "
              "own local model). Unseen: holdout clients, which never train and adapt the global "
              "model for federation.holdout_steps steps before they evaluate.", ""]
    return "\n".join(lines)
