"""A deployed client's persistent state on its own disk (`<output.dir>/<name>/state.safetensors`):
its personal adapter and whatever else its algorithm keeps between rounds, so a restarted
`fedtune client` continues with it. Written atomically after each message that may change it;
safetensors only (no pickle), checked when read back."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedtune.errors import DeploymentError

STATE_FILE = "state.safetensors"
State = dict[str, torch.Tensor]


def state_path(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / name / STATE_FILE


def save_client_state(path: Path, state: State, algorithm: str) -> None:
    """Replace the stored state with `state` (a temporary file renamed over the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(tmp),
              metadata={"format": "pt", "algorithm": algorithm})
    os.replace(tmp, path)


def load_client_state(path: Path, algorithm: str) -> State:
    """The stored state ({} when there is none); refused when damaged, non-finite, or kept by
    another algorithm (the file is left as it is)."""
    if not path.is_file():
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            kept_by = (f.metadata() or {}).get("algorithm")
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DeploymentError(f"{path}: not a readable client state ({exc}); move it away to start "
                              "this client afresh") from None
    if kept_by != algorithm:
        raise DeploymentError(f"{path}: kept by algorithm {kept_by!r}, this recipe runs {algorithm!r}; "
                              "move it away to start this client afresh")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DeploymentError(f"{path}: tensor {name!r} holds NaN or Inf; move the file away")
    return state
