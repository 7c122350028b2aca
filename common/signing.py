"""Replies signed at the site: the worker signs each reply with an Ed25519 key made at the site, and the coordinator
checks it against the public key enrolled for the site id the reply claims. A site id then belongs to its key, not
to the first node that claims it, and a reply cannot be moved to another request or altered on the way."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from flwr.app import ConfigRecord, Message

from mome.common.wire import array_digests

SIGNATURE = "signature"  # the ConfigRecord a signed reply carries
ALGORITHM = "ed25519"
PUBLIC_SUFFIX = ".pub"  # the coordinator's folder of enrolled keys holds <site-id>.pub


def signed_bytes(reply: Message) -> bytes:
    """What a signature covers: the request it answers (its message id names the run, the step and the node), the
    action, and every value of the reply (arrays by SHA-256) except the signature itself."""
    content = reply.content
    return json.dumps({"request": reply.metadata.reply_to_message_id, "action": reply.metadata.message_type,
                       "arrays": array_digests(content),
                       "metrics": {n: dict(r) for n, r in content.metric_records.items()},
                       "configs": {n: dict(r) for n, r in content.config_records.items() if n != SIGNATURE}},
                      sort_keys=True, default=repr).encode()


def sign(reply: Message, key: Ed25519PrivateKey) -> Message:
    """The reply with its signature record added (an error reply carries no content and stays unsigned)."""
    if not reply.has_error():
        reply.content[SIGNATURE] = ConfigRecord({ALGORITHM: key.sign(signed_bytes(reply))})
    return reply


def verify(reply: Message, public: Ed25519PublicKey) -> bool:
    record = reply.content.config_records.get(SIGNATURE)
    signature = record.get(ALGORITHM) if record is not None else None
    if not isinstance(signature, bytes):
        return False
    try:
        public.verify(signature, signed_bytes(reply))
    except InvalidSignature:
        return False
    return True


def write_signing_key(path: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """A new Ed25519 key pair: `path` (private, PEM, mode 0600 from the start) and `path`.pub (OpenSSH line)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public = path.with_name(path.name + PUBLIC_SUFFIX)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return path, public


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_ssh_public_key(Path(path).read_bytes().strip())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def enrolled_keys(folder: str | Path) -> dict[str, Ed25519PublicKey]:
    """{site id: public key} from a folder of <site-id>.pub files ("" or absent: no keys, no signatures checked)."""
    if not folder:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"site-keys {folder} is not a folder of <site-id>.pub files")
    return {p.name[: -len(PUBLIC_SUFFIX)]: load_public_key(p) for p in sorted(folder.glob(f"*{PUBLIC_SUFFIX}"))}
