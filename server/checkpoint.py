"""Atomic per-step checkpoints of the server state (one .npz, no pickle), and resuming from the latest readable
one made with the same training config and plan."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mome.common.atomic import atomic_write_bytes
from mome.common.state import State, flatten_states, load_state, save_state, unflatten_states

log = logging.getLogger("mome.server")

WEIGHTS = ("base", "gate", "experts")  # server-state entries holding model weights; the rest is JSON metadata


@dataclass
class ServerState:
    """All a coordinator's run holds between steps; checkpointed after each one (weights as arrays, the rest JSON)."""

    step: int = 0  # steps done
    base: State | None = None  # the shared model (warm-up for MoME, the one model of FedAvg)
    experts: dict[str, State] = field(default_factory=dict)  # each site's expert, by site id
    gate: State | None = None
    gate_sites: list[str] | None = None  # the experts the gate weighs, in its output order
    labels: dict | None = None  # the federation's label spec, set by the coordinator
    plan: dict | None = None  # target spacing and patch size, from the sites' geometry
    recipe: dict | None = None  # the training config and steps the weights come from, with their hash
    history: list[dict] = field(default_factory=list)  # one entry per step done: phase, sites, seconds
    dropped: list[dict] = field(default_factory=list)  # replies dropped, with step, site and reason
    traffic: dict[str, dict] = field(default_factory=dict)  # bytes up and down per site
    identity: list[dict] = field(default_factory=list)  # node <-> site binding events
    bindings: dict[str, int] = field(default_factory=dict)  # site id -> node id at the last step

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # not asdict(): it would deep-copy the weights

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ServerState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _flatten(state: ServerState) -> tuple[dict, dict]:
    values = state.as_dict()
    meta = {k: v for k, v in values.items() if k not in WEIGHTS}
    meta.update({f"{key}:present": values[key] is not None for key in WEIGHTS})
    meta["experts:sites"] = sorted(state.experts)
    return flatten_states({key: values[key] for key in WEIGHTS if values[key] is not None}), meta


def _unflatten(arrays: dict, meta: dict) -> ServerState:
    values = {k: v for k, v in meta.items() if ":" not in k}
    weights = unflatten_states(arrays)
    for key in WEIGHTS:
        values[key] = weights.get(key, {}) if meta[f"{key}:present"] else None
    values["experts"] = {site: values["experts"].get(site, {}) for site in meta["experts:sites"]}
    if "recipe" not in values and isinstance(old := values.get("fingerprint"), dict):  # written before the rename
        values["recipe"] = recipe(old.get("config", {}), old.get("plan", []))
    return ServerState.from_dict(values)


def save_checkpoint(folder: Path, state: ServerState) -> Path:
    """Write step_NNN.npz for the state's step, then point `latest` at it (a crash between the two keeps the
    previous one)."""
    arrays, meta = _flatten(state)
    path = save_state(folder / f"step_{state.step:03d}.npz", arrays, meta)
    atomic_write_bytes(folder / "latest", path.name.encode())
    return path


def load_checkpoint(path: Path) -> ServerState:
    return _unflatten(*load_state(path))


def load_latest(folder: Path) -> ServerState | None:
    """The checkpoint `latest` points at or, if that one is missing or unreadable, the newest readable one."""
    pointer = folder / "latest"
    named = [folder / pointer.read_text().strip()] if pointer.is_file() else []
    candidates = named + sorted(folder.glob("step_*.npz"), reverse=True) if folder.is_dir() else named
    for path in candidates:
        try:
            return load_checkpoint(path)
        except Exception as exc:  # a torn or foreign file: fall back to the one before
            log.warning("checkpoint %s unreadable (%s); trying an older one", path.name, type(exc).__name__)
    return None


def recipe(training: dict[str, Any], steps: list) -> dict[str, Any]:
    """What a checkpoint's weights depend on: the training config and the steps, with their hash."""
    body = {"config": training, "steps": [list(s) for s in steps]}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    return {**body, "hash": digest}


class ResumeRefused(RuntimeError):
    """A checkpoint made with another training config or steps."""


def check_resumable(saved: dict[str, Any] | None, current: dict[str, Any], step: int) -> None:
    """Refuse to resume from a checkpoint whose recipe differs, naming the keys that differ."""
    if saved is None:
        raise ResumeRefused(f"the checkpoint after step {step} records no config; resume with --force-resume")
    if saved["hash"] == current["hash"]:
        return
    old, new = saved["config"], current["config"]
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    changes = ", ".join(f"{k.replace('_', '-')} ({old.get(k)!r} -> {new.get(k)!r})" for k in keys[:8])
    raise ResumeRefused(f"the checkpoint after step {step} was made with another config: {changes or 'other steps'}; "
                        "rerun with the same config, another run folder, or --force-resume (force-resume=true)")
