"""Deployment credentials: a CA, the SuperLink's TLS certificate, and SuperNode auth key pairs.

A hospital makes its own key pair (`mome site-key`) and sends only the public key; the coordinator makes site key
pairs itself only for one-machine trials (`mome certs --site-keys`, `mome deploy-local`)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mome.common.atomic import atomic_write_bytes
from mome.common.signing import write_signing_key

# Names the SuperLink answers to: loopback for local deployment, the compose service for containers.
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "superlink")
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink.crt", "superlink.key"
# ssh-keygen's names (`ssh-keygen -f auth.key` writes auth.key.pub): a hospital may make its key either way
SITE_KEY = "auth.key"
SITE_PUBLIC_KEY = f"{SITE_KEY}.pub"
SIGNING_KEY = "sign.key"  # the site worker's reply-signing key (Ed25519), made at the site like auth.key
ENROLLED_SIGNING = "signing"  # the coordinator's folder of sites' signing public keys, <site-id>.pub (site-keys)


@dataclass(frozen=True)
class CertPaths:
    """Where `write_certificates` put each file (the same names the topology mounts)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.root / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.root / SERVER_KEY

    def site_key(self, site_id: str) -> Path:
        """OpenSSH private key: stays at the site (`flower-supernode --auth-supernode-private-key`)."""
        return self.root / "sites" / site_id / SITE_KEY

    def site_public_key(self, site_id: str) -> Path:
        """OpenSSH public key: what the coordinator enrols (`flwr supernode register`); a hospital's own goes here."""
        return self.root / "sites" / site_id / SITE_PUBLIC_KEY

    def signing_key(self, site_id: str) -> Path:
        """The site worker's private signing key (`mome site serve --signing-key`); stays at the site."""
        return self.root / "sites" / site_id / SIGNING_KEY

    def enrolled_signing_key(self, site_id: str) -> Path:
        """Where the coordinator keeps a site's signing public key: the ServerApp's `site-keys` folder."""
        return self.root / ENROLLED_SIGNING / f"{site_id}.pub"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write atomically (a new file beside the target, then a rename over it), created 0600: no other user can
    open a private key even in the instant a write-then-chmod would leave it world-readable."""
    atomic_write_bytes(path, data, None if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # keep order, drop repeats
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_ca(days: int = 365) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that signs the SuperLink certificate (SuperNodes trust only this)."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MoME federation CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     names: tuple[str, ...] = DEFAULT_SERVER_NAMES,
                     days: int = 365) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate, valid for every name in `names` (DNS names or IP addresses)."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(_san(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def write_key_pair(key_path: Path, comment: str, overwrite: bool = False) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format: the private key at key_path (0600), the public one at
    key_path + ".pub" (what `flwr supernode register` enrols and `flower-supernode` proves it holds).

    An existing key is kept (FileExistsError) unless overwrite: it may be enrolled already."""
    key_path = Path(key_path)
    public_path = key_path.with_name(key_path.name + ".pub")
    existing = [str(p) for p in (key_path, public_path) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"a key is already there: {', '.join(existing)}")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(key_path, private, private=True)
    _write(public_path, public + f" {comment}\n".encode())
    return key_path, public_path


def fingerprint(public_path: Path) -> str:
    """SHA256:<base64> of the key blob, as `ssh-keygen -l` prints it: read aloud to check the right key arrived."""
    blob = base64.b64decode(Path(public_path).read_text().split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def check_public_key(path: Path, kind: str) -> str:
    """The fingerprint of a site's public key, after checking it is one Flower (`ecdsa`: SuperNode auth) or the
    coordinator (`ed25519`: reply signatures) accepts; ValueError saying what the file is instead."""
    wanted = {"ecdsa": ec.EllipticCurvePublicKey, "ed25519": ed25519.Ed25519PublicKey}[kind]
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes().strip())
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path}: not an OpenSSH public key ({str(exc)[:80]})") from None
    if not isinstance(key, wanted):
        raise ValueError(f"{path}: a {type(key).__name__.removeprefix('_')} key, not the {kind} key this slot takes "
                         f"(`mome site-key` makes both)")
    return fingerprint(path)


def write_site_key(paths: CertPaths, site_id: str, overwrite: bool = False) -> tuple[Path, Path]:
    """A site's key pair made by the coordinator: for one-machine trials only (the private key must travel)."""
    return write_key_pair(paths.site_key(site_id), f"mome-{site_id}", overwrite=overwrite)


def write_certificates(out: Path, site_ids: list[str], server_names: tuple[str, ...] = DEFAULT_SERVER_NAMES,
                       days: int = 365, overwrite: bool = False, site_keys: bool = False) -> CertPaths:
    """Create the CA and the SuperLink certificate under `out`; with site_keys, also one key pair per site.

    Without site_keys each site's public key is expected at sites/<site-id>/auth.key.pub, made at the hospital.
    An existing CA is kept (unless overwrite) so adding a site does not invalidate the others; a site's key or
    public key that already exists is kept too (it may be enrolled already, or be the hospital's own)."""
    paths = CertPaths(Path(out))
    paths.root.mkdir(parents=True, exist_ok=True)
    new_ca = overwrite or not (paths.ca_cert.exists() and paths.ca_key.exists())
    if new_ca:
        ca_key, ca_cert = make_ca(days)
        _write(paths.ca_key, _pem_key(ca_key), private=True)
        _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    else:
        ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    # a new CA needs a new server certificate, never new site keys (a hospital's own public key stays)
    if new_ca or not paths.server_cert.exists() or _names(paths.server_cert) != set(server_names):
        server_key, server_cert = make_server_cert(ca_key, ca_cert, tuple(server_names), days)
        _write(paths.server_key, _pem_key(server_key), private=True)
        _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    for site_id in site_ids if site_keys else ():
        if overwrite or not (paths.site_key(site_id).exists() or paths.site_public_key(site_id).exists()):
            write_site_key(paths, site_id, overwrite=True)
        if overwrite or not paths.enrolled_signing_key(site_id).exists():
            _, public = write_signing_key(paths.signing_key(site_id), overwrite=True)
            paths.enrolled_signing_key(site_id).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(public, paths.enrolled_signing_key(site_id))
    return paths


def _names(cert_path: Path) -> set[str]:
    """The SAN entries of a certificate, as strings."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)}
