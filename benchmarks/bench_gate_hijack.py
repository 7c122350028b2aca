"""Can one site steer the gate every site receives? One of four sites (the last) answers every gate round with the
update that pushes the gate's routing towards its own expert as far as the coordinator's per-update bound allows
(max-update-ratio x the norm of the gate it was sent, all of it on its own expert's prior), on Flower's simulation
engine, with the default config. The same federation without the attacker is the reference.

Reported per run: the honest sites' final Dice (the mixture each keeps), the attacker's share of the federation's
global gate (the softmax of its prior, the part of the routing that is the same for every case; 1/K is no say
beyond its place) and the mean weight the honest sites' own gates give its expert on their held-out cases.
--undefended adds the attacked run under the pre-#26 rules (weighted FedAvg of the gate, no clipping); --control one
where the same site sends back the gate it was sent, unchanged (what the attack costs beyond that site's missing
honest update). --reference takes the run without the attacker from a `mome bench` folder (its MoME run on the same
preset and seed, the same sites and config) instead of running it again; --keep keeps the runs (DIR/run-N) for
benchmarks/bench_gate_path.py.

    python benchmarks/bench_gate_hijack.py [--seed 0] [--preset mixed] [--undefended] [--control] [--only-extra]
                                        [--run-config ".."] [--reference BENCH_DIR] [--keep DIR]
                                        [--out docs/bench/gate-hijack]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
from flwr.app import Message, RecordDict

from mome.common.config import config_from_mapping, parse_run_config
from mome.common.wire import Action, Key, pack, unpack
from mome.server.checkpoint import load_latest
from mome.sim.run_sim import DEMO_BUDGET, simulate
from mome.sim.synth import generate_federation

PRIOR = "mlp.2.bias"  # GateNet.prior: the gate's output bias
UNDEFENDED = {"gate-aggregation": "fedavg", "update-clip": 0.0}


def _gate_reply(attacker: str, forge):
    """A client mod: at the attacker, every gate update is replaced by forge(sent gate, expert names)."""

    def mod(msg: Message, context, call_next) -> Message:
        reply = call_next(msg, context)
        if (msg.metadata.message_type != Action.TRAIN_GATE or reply.has_error()
                or str(reply.content["site"]["site-id"]) != attacker):
            return reply
        names = [k[len(Key.EXPERT_PREFIX):] for k in msg.content.array_records if k.startswith(Key.EXPERT_PREFIX)]
        content = RecordDict({k: v for k, v in reply.content.items() if k != Key.MODEL})
        content[Key.MODEL] = pack(forge(unpack(msg.content[Key.GATE]), names))
        return Message(content, reply_to=msg)

    return mod


def hijack(attacker: str, ratio: float, ceiling: float):
    """The sent gate plus the largest push on the attacker's own expert's prior that passes the coordinator's update
    bound (90 % of it)."""

    def forge(sent: dict, names: list[str]) -> dict:
        norm = float(np.sqrt(sum(float(np.square(v.astype(np.float64)).sum()) for v in sent.values())))
        forged = {k: v.copy() for k, v in sent.items()}
        forged[PRIOR][names.index(attacker)] += 0.9 * min(ratio * norm, ceiling)
        return forged

    return _gate_reply(attacker, forge)


def abstain(attacker: str):
    """The gate it was sent, unchanged (the hijack's control: the same site taking part without a change of its
    own, and without the push)."""
    return _gate_reply(attacker, lambda sent, names: sent)


def reference_run(bench_dir: Path, preset: str, seed: int, cfg) -> tuple[list[Path], Path]:
    """(site folders, MoME run) of a `mome bench` run with this preset, seed and config; refused if they differ."""
    run = bench_dir / preset / f"seed-{seed}"
    stored = json.loads((run / "mome" / "config.json").read_text())
    planned = {"strategy", "start_sites", "target_spacing", "patch_size"}  # set by the run itself
    differ = sorted(k for k, v in cfg.to_dict().items() if k not in planned and stored.get(k) != v)
    if differ:
        raise SystemExit(f"{run}: not this config ({', '.join(differ)} differ)")
    return sorted(p for p in (run / "data").iterdir() if p.is_dir()), run / "mome"


def summary(out: Path, attacker: str) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    state = load_latest(out / "checkpoints")
    prior = state.gate[PRIOR].astype(np.float64)
    share = np.exp(prior - prior.max()) / np.exp(prior - prior.max()).sum()
    own = state.gate_sites.index(attacker)
    sites = metrics["sites"]
    honest = {s: e.get("dice_mean") for s, e in sites.items() if s != attacker}
    return {"honest_dice": honest, "attacker_dice": sites.get(attacker, {}).get("dice_mean"),
            "global_share": float(share[own]), "k": len(share),
            "honest_weight": statistics.mean(e["gate_weights"][own] for s, e in sites.items()
                                             if s != attacker and e.get("gate_weights"))}


def table(runs: dict[str, dict]) -> str:
    sites = sorted(next(iter(runs.values()))["honest_dice"])
    lines = ["| run | " + " | ".join(sites) + " | honest mean | attacker's global-gate share | "
             "its weight at honest sites |", "|---" * (len(sites) + 4) + "|"]
    for name, r in runs.items():
        dice = [r["honest_dice"][s] for s in sites]
        lines.append(f"| {name} | " + " | ".join(f"{d:.3f}" for d in dice)
                     + f" | {statistics.mean(dice):.3f} | {r['global_share']:.3f} (1/K = {1 / r['k']:.3f}) "
                     f"| {r['honest_weight']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="mixed")
    parser.add_argument("--undefended", action="store_true", help="also the attack under the pre-#26 rules")
    parser.add_argument("--control", action="store_true", help="also the attacker sending its gate back unchanged "
                        "(what the push adds beyond the loss of its own honest update)")
    parser.add_argument("--only-extra", action="store_true", help="skip the two main runs (for --control or "
                        "--undefended alone)")
    parser.add_argument("--run-config", default="", help="run-config overrides (e.g. a smaller budget)")
    parser.add_argument("--reference", type=Path, help="a `mome bench` folder: its MoME run on this preset and seed "
                        "is the run without the attacker")
    parser.add_argument("--keep", type=Path, help="keep the runs in this folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, help="write <out>.md and <out>.json")
    args = parser.parse_args()
    cfg = config_from_mapping({**DEMO_BUDGET, **parse_run_config(args.run_config), "seed": args.seed})
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        if args.reference:
            sites, reference = reference_run(args.reference, args.preset, args.seed, cfg)
        else:
            sites = generate_federation(root / "data", sites=4, preset=args.preset, seed=args.seed, size=cfg.size)
        attacker = sites[-1].name
        if args.reference and not args.only_extra:
            runs["without the attacker"] = summary(reference, attacker)
        plans = [] if args.only_extra else [
            *([] if args.reference else [("without the attacker", cfg, [])]),
            ("attacked, defaults", cfg, [hijack(attacker, cfg.max_update_ratio, cfg.max_update_norm)])]
        if args.control:
            plans.append(("attacker abstains, defaults", cfg, [abstain(attacker)]))
        if args.undefended:
            weak = cfg.replace(**{k.replace("-", "_"): v for k, v in UNDEFENDED.items()})
            plans.append(("attacked, undefended", weak, [hijack(attacker, weak.max_update_ratio,
                                                                 weak.max_update_norm)]))
        for i, (name, run_cfg, mods) in enumerate(plans):
            simulate("mome", sites, run_cfg, root / f"run-{i}", mods=mods)
            runs[name] = summary(root / f"run-{i}" / "mome", attacker)
            print(f"{name}: {json.dumps(runs[name])}", flush=True)
    flags = [f for f, on in (("--undefended", args.undefended), ("--control", args.control),
                             ("--only-extra", args.only_extra)) if on]
    flags += [f"--reference {args.reference}"] if args.reference else []
    command = " ".join(["python benchmarks/bench_gate_hijack.py", f"--seed {args.seed} --preset {args.preset}",
                        *flags, *([f"--run-config {args.run_config!r}"] if args.run_config else [])])
    head = (f"# Gate hijack: {attacker} of 4 pushes its own expert at every gate round\n\n`{command}`, {args.preset} "
            f"preset, seed {args.seed}, the default config{' with those overrides' if args.run_config else ''} "
            f"(gate-aggregation {cfg.gate_aggregation}, gate-trim-fraction {cfg.gate_trim_fraction}, update-clip "
            f"{cfg.update_clip}). Honest sites' final Dice on their held-out cases.\n\n")
    text = head + table(runs) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
