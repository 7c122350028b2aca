"""A hospital's commands: check its data folder, make its SuperNode key, segment cases with a model bundle."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mome.common.config import Config


def check_data(args: argparse.Namespace) -> int:
    from mome.common.cases import load_site
    from mome.common.sitedata import SiteDataError

    cfg = Config(modalities=args.modalities, clinical_fields=args.clinical_fields)
    worst = 0
    for site_dir in args.site_dirs:
        try:
            data = load_site(site_dir, cfg, progress=True)
        except SiteDataError as exc:
            print(f"site {site_dir}\n  unusable: {exc}")
            worst = 1
            continue
        print(data.report.format())
        if geometry := data.aggregate_geometry():  # medians over the cases: what describe reports for the plan
            print("  geometry (RAS, medians): spacing " + "x".join(f"{v:g}" for v in geometry["spacing"]) +
                  " mm, head extent " + "x".join(f"{v:.0f}" for v in geometry["extent_mm"]) + " mm")
        if not data.train:
            print("  unusable: no training case passed validation")
            worst = 1
        if data.report.contract:  # usable, but what the federation expects is not what the site holds
            worst = 1
    return worst


def predict(args: argparse.Namespace) -> int:
    from mome.client.predict import predict as segment
    from mome.common.sitedata import SiteDataError

    try:
        notes: list[str] = []
        written, problems = segment(Path(args.model), [Path(p) for p in args.input], Path(args.out), notes,
                                    overlays=args.overlay, allow_missing=args.allow_missing)
    except (OSError, ValueError, SiteDataError) as exc:  # a missing bundle, misnamed inputs, a bad dataset.json
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    for note in notes:
        print(f"note: {note}")
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    return 0 if written else 1


def adapt(args: argparse.Namespace) -> int:
    from mome.client.adapt import adapt as fit
    from mome.common.sitedata import SiteDataError

    try:
        result = fit(Path(args.model), Path(args.site), Path(args.out), args.passes)
    except (OSError, ValueError, SiteDataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"adapted on {result['cases']} labelled case(s) of {result['site']}, {result['passes']} pass(es): "
          f"{Path(args.out) / 'model'}")
    if "adapted.dice_mean" in result:
        print(f"held-out Dice ({result['n_test']} labelled case(s)): as given {result['given.dice_mean']:.3f}, "
              f"adapted {result['adapted.dice_mean']:.3f}")
    else:
        print(f"no held-out scores: {result['reason']}")
    if result.get("n_segmented"):
        print(f"segmented {result['n_segmented']} unlabelled held-out case(s) into {Path(args.out) / 'predictions'}")
    return 0


def site_serve(args: argparse.Namespace) -> int:
    import logging

    from mome.client.policy import PREFIX, SitePolicy
    from mome.client.worker import SERVICE, Worker, code_hash, new_token
    from mome.common.config import package_version
    from mome.common.signing import load_signing_key
    from mome.common.wire import site_id_from_name

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    try:
        if not (Path(args.data) / "dataset.json").exists():
            raise ValueError(f"{args.data} is not a site folder (no dataset.json)")
        policy = SitePolicy.from_node_config({f"{PREFIX}file": args.policy} if args.policy else {})
        site_id = args.site_id or site_id_from_name(Path(args.data).name)
        key = load_signing_key(Path(args.signing_key)) if args.signing_key else None
        worker = Worker(Path(args.data), site_id, Path(args.out), new_token(Path(args.token_file)), policy, key)
        server = worker.serve(args.listen)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"mome site worker {package_version()} ({SERVICE}), code sha256 {code_hash()}\n"
          f"site {site_id}: data {args.data} (read only), out {args.out}; listening on {args.listen}; "
          f"token in {args.token_file}; replies {'signed with ' + args.signing_key if key else 'unsigned'}",
          flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(5)
    return 0


def site_key(args: argparse.Namespace) -> int:
    from mome.common.signing import write_signing_key
    from mome.common.wire import check_site_id
    from mome.deploy.certs import ENROLLED_SIGNING, SIGNING_KEY, SITE_KEY, fingerprint, write_key_pair

    try:
        comment = f"mome-{check_site_id(args.site_id)}" if args.site_id else "mome-site"
        if not args.overwrite and (Path(args.out) / SIGNING_KEY).exists():
            raise FileExistsError(f"{Path(args.out) / SIGNING_KEY} exists")
        key, public = write_key_pair(Path(args.out) / SITE_KEY, comment, overwrite=args.overwrite)
        signing, signing_public = write_signing_key(Path(args.out) / SIGNING_KEY, overwrite=True)
    except (FileExistsError, ValueError) as exc:
        hint = " (--overwrite replaces it; the coordinator must then enrol the new key)" \
            if isinstance(exc, FileExistsError) else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 1
    site = args.site_id or "<site-id>"
    print(f"wrote {key} (private, mode 0600: it never leaves this machine) and {public}\n"
          f"send the coordinator only {public} (fingerprint {fingerprint(public)}; confirm it by phone);\n"
          f"  it goes to certs/sites/{site}/auth.key.pub and is enrolled with `flwr supernode register`\n"
          f"start the SuperNode with: --auth-supernode-private-key {key} "
          f"(in a container: mount it at /certs/auth.key)\n"
          f"wrote {signing} (private, 0600: the site worker's, `mome site serve --signing-key {signing}`) and "
          f"{signing_public}\n"
          f"send the coordinator {signing_public} too (fingerprint {fingerprint(signing_public)}); it goes to "
          f"certs/{ENROLLED_SIGNING}/{site}.pub: every reply the coordinator accepts from {site} is signed by it")
    return 0


def audit(args: argparse.Namespace) -> int:
    """What this site sent, run by run, from its own audit log(s) under OUT_DIR."""
    from mome.client.audit import AUDIT_FILE, read, summary

    logs = [args.out_dir] if args.out_dir.is_file() else sorted(args.out_dir.rglob(AUDIT_FILE))
    if not logs:
        print(f"error: no {AUDIT_FILE} under {args.out_dir} (the site's out-dir)", file=sys.stderr)
        return 1
    if args.json:  # every entry as it is kept, one JSON object per line, with the log it came from
        for path in logs:
            for item in read(path):
                print(json.dumps({"log": str(path), **item}))
        return 0
    print("\n\n".join(summary(path) for path in logs))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    defaults = Config()
    p = sub.add_parser("check-data", help="validate site folders; exit 1 if a site has no usable case")
    p.add_argument("site_dirs", nargs="+", type=Path, metavar="SITE_DIR")
    p.add_argument("--modalities", default=defaults.modalities)
    p.add_argument("--clinical-fields", default=defaults.clinical_fields)
    p.set_defaults(func=check_data)

    p = sub.add_parser("site-key", help="make this site's SuperNode key pair; send only auth.key.pub to the "
                                        "coordinator")
    p.add_argument("--out", required=True, help="folder for auth.key (private, 0600) and auth.key.pub")
    p.add_argument("--site-id", help="the site id the coordinator gave you (a comment in the public key)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing key (it must be enrolled again)")
    p.set_defaults(func=site_key)

    p = sub.add_parser("audit", help="summarise what this site sent (its out-dir's audit.jsonl), run by run")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the site's out-dir, or an audit.jsonl")
    p.add_argument("--json", action="store_true", help="every entry as JSON lines instead of the summary")
    p.set_defaults(func=audit)

    p = sub.add_parser("adapt", help="fit a federation's model to this site's few labelled cases (a mixture's gate is "
                                     "personalised, a single model fine-tuned), then segment its new cases")
    p.add_argument("--model", required=True, help="the bundle you were given (e.g. <run>/mome/model)")
    p.add_argument("--site", required=True, help="your site folder: imagesTr/labelsTr to adapt on, imagesTs to segment")
    p.add_argument("--out", required=True, help="folder for the adapted model/ and predictions/")
    p.add_argument("--passes", type=int, default=None,
                   help="passes over the cases (default: the bundle's personalise-epochs)")
    p.set_defaults(func=adapt)

    p = sub.add_parser("site", help="the site worker: `mome site serve` runs this site's steps for the relay")
    serve = p.add_subparsers(dest="site_command", required=True).add_parser(
        "serve", help="serve this site's steps on a local socket (the coordinator's app only relays to it)")
    serve.add_argument("--data", required=True, help="the site folder (opened read-only)")
    serve.add_argument("--site-id", help="default: from the folder name")
    serve.add_argument("--out", required=True, help="the site's output folder (models, audit.jsonl, cache)")
    serve.add_argument("--listen", default="unix:///run/mome/worker.sock",
                       help="unix:///path or localhost:port")
    serve.add_argument("--token-file", default="/run/mome/worker.token",
                       help="a fresh token is written here (0600); the SuperNode's node config names this file")
    serve.add_argument("--policy", help="the site's policy (TOML: max-epochs, min-cases, allowed-strategies, ...)")
    serve.add_argument("--signing-key", help="sign every reply with this key (`mome site-key` writes sign.key; "
                                             "the coordinator enrols sign.key.pub)")
    serve.set_defaults(func=site_serve)

    p = sub.add_parser("predict", help="write NIfTI segmentations with a saved model bundle")
    p.add_argument("--model", required=True, help="bundle folder (e.g. <run>/mome/sites/<site>/model)")
    p.add_argument("--input", required=True, nargs="+",
                   help="a site folder (its dataset.json names the channels), or files/folders of "
                        "<case>_<cccc>.nii.gz, cccc the sequence's index in the bundle's modalities (default "
                        "0000 T1, 0001 T1ce, 0002 T2, 0003 FLAIR; metadata.json lists them); only the files "
                        "given are read")
    p.add_argument("--out", required=True, help="folder for <case>.nii.gz")
    p.add_argument("--allow-missing", action="store_true",
                   help="segment a case that lacks some of the bundle's sequences without them (the model was "
                        "trained to; each such case is named); without it such a case is skipped")
    p.add_argument("--overlay", action="store_true",
                   help="also write <case>.png: the slice through the most lesion, image and segmentation")
    p.set_defaults(func=predict)
