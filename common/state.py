"""Model state as named numpy arrays, and atomic save/load of a state with its metadata."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from mome.common.atomic import atomic_write_bytes

META_KEY = "__meta__"  # reserved array name holding the JSON metadata
State = dict[str, np.ndarray]  # a model's weights by state-dict name


def state_to_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    """Every parameter and buffer as an independent CPU numpy copy, keyed by state-dict name."""
    return {name: t.detach().cpu().numpy().copy() for name, t in module.state_dict().items()}


def load_numpy_state(module: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load arrays into module; names and shapes must match exactly, else ValueError saying what differs."""
    own = module.state_dict()
    missing = sorted(set(own) - set(arrays))
    unexpected = sorted(set(arrays) - set(own))
    wrong = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(np.shape(arrays[k]))}"
             for k in own if k in arrays and tuple(own[k].shape) != tuple(np.shape(arrays[k]))]
    problems = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "",
                f"shape mismatch {wrong}" if wrong else ""]
    if any(problems):
        raise ValueError(f"state does not fit {type(module).__name__}: " + "; ".join(p for p in problems if p))
    module.load_state_dict(
        {k: torch.as_tensor(np.asarray(arrays[k])).to(dtype=own[k].dtype, device=own[k].device) for k in own}
    )


def float_changes(update: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """update - sent over the float arrays (in float64): the change a site made to the weights it was sent."""
    return {n: update[n].astype(np.float64) - sent[n] for n, a in sent.items() if a.dtype.kind == "f"}


def l2_norm(arrays) -> float:
    """The L2 norm of several arrays taken together."""
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))


def flatten_states(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts of arrays -> one flat mapping with '/'-joined keys, as an .npz holds them:
    {'experts': {'site-a': {'w': x}}, 'gate': {'w': y}} -> {'experts/site-a/w': x, 'gate/w': y}."""
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten_states(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten_states(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The inverse of flatten_states (state-dict names hold dots, never '/')."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *path, name = key.split("/")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[name] = value
    return tree


def save_state(path: Path | str, module: nn.Module | Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    """Write arrays + JSON metadata as one .npz, atomically (temp file in the same folder, then os.replace)."""
    path = Path(path)
    arrays = state_to_numpy(module) if isinstance(module, nn.Module) else dict(module)
    if META_KEY in arrays:
        raise ValueError(f"array name {META_KEY!r} is reserved")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, **{META_KEY: np.array(json.dumps(dict(meta)))})
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_state(path: Path | str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read (arrays, meta) written by save_state; no pickle is ever loaded."""
    with np.load(Path(path), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != META_KEY}
        meta = json.loads(str(data[META_KEY])) if META_KEY in data.files else {}
    return arrays, meta
