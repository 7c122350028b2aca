"""What a hospital controls (#16): its own key, keys never readable by others, inputs refused by their declared
size before they are read, and a site container confined to its own network, user and folders."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import re
import subprocess
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from mome.cli.main import main as mome
from mome.common.bundle import Bundle, check_weights_size, load_bundle, save_bundle
from mome.common.config import Config
from mome.common.labels import label_spec_from_dataset_json
from mome.common.model import load_expert
from mome.common.signing import load_public_key, load_signing_key
from mome.common.state import state_to_numpy
from mome.common.cases import load_site
from mome.common.sitedata import BadCase, SiteLayout, read_case
from mome.deploy.certs import CertPaths, write_certificates
from mome.deploy.compose import compose_dict, expand
from mome.deploy.topology import FLEET_NETWORK, IMAGE_UID, RUN, SUPERLINK, Confinement, Topology
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
PRIVATE_NAMES = ("ca.key", "superlink.key", "auth.key")


# -- keys ---------------------------------------------------------------------------------------
@pytest.fixture
def no_umask():
    """Umask 0: a key's mode must come from how it was created, not from a lucky umask."""
    before = os.umask(0)
    yield
    os.umask(before)


def test_private_keys_are_0600_from_the_moment_they_exist(tmp_path, monkeypatch, no_umask):
    created: dict[str, int] = {}  # file name -> its mode right after creation, before any byte is written
    real_open = os.open

    def recording_open(path, flags, mode=0o777, *args, **kwargs):
        fd = real_open(path, flags, mode, *args, **kwargs)
        if flags & os.O_CREAT:
            created[Path(path).name] = os.fstat(fd).st_mode & 0o777
        return fd

    def no_chmod(*args, **kwargs):
        raise AssertionError("a key made readable by others, then chmod-ed, was readable in between")

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "chmod", no_chmod)
    paths = write_certificates(tmp_path, ["site-a"], site_keys=True)
    for final in (paths.ca_key, paths.server_key, paths.site_key("site-a")):
        modes = [mode for name, mode in created.items() if re.fullmatch(rf"\.{re.escape(final.name)}\.\w+", name)]
        assert modes == [0o600], (final.name, created)
        assert final.stat().st_mode & 0o777 == 0o600
    assert paths.site_public_key("site-a").stat().st_mode & 0o777 == 0o644  # readable by a container's user
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # written atomically: no temporary file left


def test_site_key_makes_a_pair_flower_reads_and_keeps_an_existing_one(tmp_path, capsys):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_ssh_private_key, \
        load_ssh_public_key
    from flwr.cli.supernode.register import try_load_public_key

    out = tmp_path / "keys"
    assert mome(["site-key", "--out", str(out), "--site-id", "site-a"]) == 0
    key_path, pub_path = out / "auth.key", out / "auth.key.pub"
    private = load_ssh_private_key(key_path.read_bytes(), password=None)
    public = load_ssh_public_key(pub_path.read_bytes())
    assert isinstance(private.curve, ec.SECP384R1)
    assert public.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH) == \
        private.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    assert try_load_public_key(pub_path)  # what `flwr supernode register` accepts
    assert key_path.stat().st_mode & 0o777 == 0o600
    said = capsys.readouterr().out
    assert str(pub_path) in said and f"--auth-supernode-private-key {key_path}" in said
    assert "PRIVATE KEY" not in said
    signing = load_signing_key(out / "sign.key")  # the worker's, written beside it; its public half to enrol
    assert load_public_key(out / "sign.key.pub").public_bytes_raw() == signing.public_key().public_bytes_raw()
    assert (out / "sign.key").stat().st_mode & 0o777 == 0o600 and "sign.key.pub" in said

    before = key_path.read_bytes()
    assert mome(["site-key", "--out", str(out)]) == 1  # an existing (maybe enrolled) key is kept
    assert "--overwrite" in capsys.readouterr().err and key_path.read_bytes() == before
    assert mome(["site-key", "--out", str(out), "--overwrite"]) == 0
    assert key_path.read_bytes() != before


def test_certs_makes_no_site_private_key_unless_asked(tmp_path, capsys):
    certs = tmp_path / "certs"
    assert mome(["certs", "--out", str(certs), "--sites", "2"]) == 0
    assert not list(certs.rglob("auth.key")) and not list(certs.rglob("*.pub"))
    assert (certs / "ca.crt").exists() and (certs / "superlink.key").exists()
    assert "mome site-key" in capsys.readouterr().out
    # the hospital's own public key goes where the enrolment service reads it, and is kept by a trial run
    assert mome(["site-key", "--out", str(tmp_path / "hospital"), "--site-id", "site-a"]) == 0
    paths = CertPaths(certs)
    paths.site_public_key("site-a").parent.mkdir(parents=True)
    hospital_pub = (tmp_path / "hospital" / "auth.key.pub").read_bytes()
    paths.site_public_key("site-a").write_bytes(hospital_pub)
    assert mome(["certs", "--out", str(certs), "--sites", "2", "--site-keys"]) == 0
    assert paths.site_public_key("site-a").read_bytes() == hospital_pub and not paths.site_key("site-a").exists()
    assert paths.site_key("site-b").exists()  # a trial key pair only where asked and nothing was enrolled
    enrol = compose_dict(Topology.for_compose(2))["services"]["enrol-site-a"]
    source = enrol["volumes"][0].rsplit(":", 2)[0]
    assert Path(expand(source, {"MOME_CERTS": str(certs)})) == paths.site_public_key("site-a")


def test_certs_checks_each_hospital_key_and_prints_its_fingerprint(tmp_path, capsys):
    """The coordinator reads the fingerprints back to the hospital; a key of the wrong kind or garbage is named."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from mome.deploy.certs import fingerprint

    certs, hospital = tmp_path / "certs", tmp_path / "hospital"
    assert mome(["site-key", "--out", str(hospital), "--site-id", "site-a"]) == 0
    paths = CertPaths(certs)
    paths.site_public_key("site-a").parent.mkdir(parents=True)
    paths.enrolled_signing_key("site-a").parent.mkdir(parents=True)
    paths.site_public_key("site-a").write_bytes((hospital / "auth.key.pub").read_bytes())
    paths.enrolled_signing_key("site-a").write_bytes((hospital / "sign.key.pub").read_bytes())
    capsys.readouterr()
    assert mome(["certs", "--out", str(certs), "--sites", "1"]) == 0
    out = capsys.readouterr().out
    assert fingerprint(hospital / "auth.key.pub") in out and fingerprint(hospital / "sign.key.pub") in out
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    paths.site_public_key("site-a").write_bytes(rsa_key.public_bytes(serialization.Encoding.OpenSSH,
                                                                     serialization.PublicFormat.OpenSSH))
    assert mome(["certs", "--out", str(certs), "--sites", "1"]) == 1
    out = capsys.readouterr().out
    assert "unusable key" in out and "RSAPublicKey key, not the ecdsa key" in out, out
    paths.enrolled_signing_key("site-a").write_text("not a key at all\n")
    paths.site_public_key("site-a").write_bytes((hospital / "auth.key.pub").read_bytes())
    assert mome(["certs", "--out", str(certs), "--sites", "1"]) == 1
    assert "sign" in (out := capsys.readouterr().out) and "not an OpenSSH public key" in out


# -- inputs refused by their declared size --------------------------------------------------------
@pytest.fixture
def no_oversized_reads(monkeypatch):
    """Reading the data of a NIfTI declaring more than max-voxels fails the test: the check needs the header only."""
    proxy = nib.arrayproxy.ArrayProxy

    def guarded(method):
        def read(self, *args, **kwargs):
            assert np.prod(self.shape, dtype=object) <= TINY.max_voxels, "an oversized NIfTI's data were read"
            return method(self, *args, **kwargs)
        return read

    monkeypatch.setattr(proxy, "__array__", guarded(proxy.__array__))
    monkeypatch.setattr(proxy, "__getitem__", guarded(proxy.__getitem__))


def _header_only(like: Path, shape: tuple[int, ...], out: Path) -> Path:
    """A .nii.gz whose header (copied from a real file) declares `shape` and which holds no voxel at all."""
    header = nib.load(str(like)).header.copy()
    header.set_data_shape(shape)
    out.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))  # header + empty extension block
    return out


def test_an_oversized_nifti_header_is_refused_unread(site_copy, no_oversized_reads):
    first = sorted((site_copy / "imagesTr").glob("*_0000.nii.gz"))[0]
    case = first.name[: -len("_0000.nii.gz")]
    _header_only(first, (4000, 4000, 4000), first)  # 64e9 voxels, 256 GB of float32: only declared
    data = load_site(site_copy, TINY)
    reasons = {c: reason for c, _, reason in data.report.skipped}
    assert reasons[case] == f"header declares {4000 ** 3} voxels, above max-voxels {TINY.max_voxels}"
    assert data.train  # the other cases still load


def test_the_voxel_cap_is_the_configured_one_for_loose_prediction_inputs(tmp_path):
    image = tmp_path / "case1_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), np.eye(4)), str(image))
    spec = label_spec_from_dataset_json({"labels": {"background": 0, "tumour": 1}})
    layout = SiteLayout(tmp_path, spec, {0: 0}, ".nii.gz", {}, max_voxels=999)  # as predict builds it
    with pytest.raises(BadCase, match="header declares 1000 voxels, above max-voxels 999"):
        read_case(layout, "case1", "Ts", 4, with_label=False, image_dir=tmp_path, allow_missing=True)
    layout = dataclasses.replace(layout, max_voxels=1000)
    assert read_case(layout, "case1", "Ts", 4, False, image_dir=tmp_path, allow_missing=True)["shape"] == (10,) * 3


@pytest.fixture
def bundle_folder(tmp_path) -> Path:
    spec = label_spec_from_dataset_json({"labels": {"background": 0, "tumour": 1}})
    return save_bundle(Bundle(Config(), spec, {"shared": state_to_numpy(load_expert(Config(), spec.n_out))}),
                       tmp_path / "model")


def test_predict_says_it_reads_nifti_only_when_given_another_format(bundle_folder, tmp_path):
    from mome.client.predict import predict

    (tmp_path / "case1_0000.mha").write_bytes(b"ObjectType = Image\n")
    with pytest.raises(ValueError, match=r"NIfTI \(.nii, .nii.gz\) only, not case1_0000.mha: convert them"):
        predict(bundle_folder, [tmp_path / "case1_0000.mha"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def no_unpacking(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("np.load ran before the size check")

    monkeypatch.setattr("mome.common.bundle.np.load", refuse)


def test_a_bundle_over_the_size_cap_is_refused_before_it_is_unpacked(bundle_folder, monkeypatch):
    expected = state_to_numpy(load_expert(Config(), 2))
    assert all(np.array_equal(v, expected[k]) for k, v in load_bundle(bundle_folder).experts["shared"].items())
    monkeypatch.setattr("mome.common.bundle.np.load", lambda *a, **k: pytest.fail("np.load ran before the size check"))
    with pytest.raises(ValueError, match=r"members declare \d+ bytes uncompressed, above the limit of 1000 bytes"):
        load_bundle(bundle_folder, max_weights_bytes=1000)


def test_a_config_declaring_a_huge_network_is_refused_before_one_is_built(bundle_folder):
    """The weights are checked against the config on torch's meta device: 8192 channels would be ~85 GB."""
    meta = json.loads((bundle_folder / "metadata.json").read_text())
    meta["config"]["channels"] = "8192,8192,8192"
    (bundle_folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="the weights of shared do not match the network its config describes"):
        load_bundle(bundle_folder)


def test_a_zip_declaring_huge_members_is_refused_by_the_default_cap(bundle_folder, no_unpacking):
    weights = bundle_folder / "weights.npz"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in ("experts/shared/a.npy", "experts/shared/b.npy"):
            archive.writestr(name, b"tiny")
    raw = bytearray(buffer.getvalue())
    for entry in re.finditer(rb"PK\x01\x02", raw):  # central directory: each member's declared size, 4 GiB - 16
        raw[entry.start() + 24: entry.start() + 28] = (2**32 - 16).to_bytes(4, "little")
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"members declare {2 * (2**32 - 16)} bytes uncompressed"):
        load_bundle(bundle_folder)


def test_a_zip_bomb_member_is_refused_by_its_compression_ratio(tmp_path, no_unpacking):
    weights = tmp_path / "weights.npz"
    with zipfile.ZipFile(weights, "w", compression=zipfile.ZIP_BZIP2) as archive:
        archive.writestr("gate/w.npy", bytes(8 * 2**20))  # 8 MiB of zeros packs into a few dozen bytes
    with pytest.raises(ValueError, match=r"member gate/w.npy declares 8388608 bytes from \d+ compressed, a ratio "
                                         r"above 1000x"):
        check_weights_size(weights)
    weights.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a weights archive"):
        check_weights_size(weights)


# -- the site's container -----------------------------------------------------------------------
def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_site_and_superlink_containers_run_confined_as_the_images_non_root_user():
    services = _compose()["services"]
    sites = {name: svc for name, svc in services.items() if name.startswith(("site-", "worker-", "superexec-"))}
    assert sorted(sites) == sorted(f"{kind}site-{c}" for c in "abc" for kind in ("", "worker-", "superexec-"))
    superlink = services[SUPERLINK]  # it runs the ServerApp: held in the same way, its state and outputs writable
    assert superlink["read_only"] is True and superlink["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in superlink["security_opt"] and expand(superlink["mem_limit"])
    assert sorted(v.rsplit(":", 1)[1] for v in superlink["volumes"] if not v.endswith(":ro")) == ["/outputs", "/state"]
    for name, svc in sites.items():
        uid, gid = expand(svc["user"]).split(":")
        assert int(uid) == int(gid) == IMAGE_UID != 0, name
        assert svc["read_only"] is True, name
        assert any(t.split(":")[0] == "/tmp" for t in svc["tmpfs"]), name
        assert svc["environment"]["HOME"] == "/tmp" and svc["environment"]["FLWR_HOME"].startswith("/tmp/")
        writable = [v for v in svc["volumes"] if not v.endswith(":ro")]
        # nothing else is writable: the worker writes the site's outputs, the SuperExec only reaches the socket
        assert [v.split(":")[-1] for v in writable] == {"worker": ["/site-out", "/run/mome"], "superexec": [
            "/run/mome"]}.get(name.split("-")[0], []), name
        assert svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"]
        assert expand(svc["mem_limit"]) == Confinement().memory and float(expand(svc["cpus"])) > 0
    assert all(expand(svc["user"]).split(":")[0] != "0" for svc in services.values())  # no service as root
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"--uid {IMAGE_UID}" in dockerfile
    assert re.findall(r"^USER (\S+)", dockerfile, re.M)[-1] == f"{IMAGE_UID}:{IMAGE_UID}"  # the image's default


@pytest.mark.skipif(os.getuid() != 0, reason="shows the refusal only when run as root (uid 0 is what it refuses)")
def test_the_image_refuses_to_run_any_service_as_root():
    """The image's entrypoint (deploy/nonroot.sh) stops a service started as uid 0 (MOME_UID=0) before it runs,
    and runs it as any other uid."""
    entrypoint = ["sh", str(ROOT / "deploy" / "nonroot.sh")]
    assert re.search(r'^ENTRYPOINT \["sh", "/app/deploy/nonroot.sh"\]', (ROOT / "Dockerfile").read_text(), re.M)
    as_root = subprocess.run([*entrypoint, "echo", "started"], capture_output=True, text=True)
    assert as_root.returncode == 78 and "refusing to run as root" in as_root.stderr and "started" not in as_root.stdout
    as_user = subprocess.run(["setpriv", f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}", "--clear-groups",
                              *entrypoint, "echo", "started"], capture_output=True, text=True)
    assert as_user.returncode == 0 and as_user.stdout.strip() == "started", as_user.stderr


def test_the_control_api_listens_on_the_superlinks_loopback_only():
    """No site can reach the Control API (no login in Flower OSS: submit a ServerApp, stop or list runs): the
    SuperLink binds it to 127.0.0.1, nothing publishes it, and only its own clients (run, enrol-*) share the
    SuperLink's network namespace. Sites share only the fleet network with the SuperLink."""
    compose = _compose()
    services = compose["services"]
    superlink = services[SUPERLINK]["command"]
    assert superlink[superlink.index("--host") + 1] == "127.0.0.1"
    assert services[SUPERLINK]["ports"] == ["${MOME_FLEET_PORT:-9092}:9092"] and services[SUPERLINK]["networks"] == [
        FLEET_NETWORK]
    assert set(compose["networks"]) == {FLEET_NETWORK, *(f"exec-site-{c}" for c in "abc")}
    in_namespace = {name for name, svc in services.items() if svc.get("network_mode") == f"service:{SUPERLINK}"}
    assert in_namespace == {name for name in services if name == RUN or name.startswith("enrol-")}
    for name, svc in services.items():
        if name.startswith("site-"):
            assert svc["networks"] == [FLEET_NETWORK, f"exec-{name}"], name
    local = Topology(("site-a",), containers=False)  # deploy-local: loopback for everything
    assert local.superlink().command[local.superlink().command.index("--host") + 1] == "127.0.0.1"


def test_container_limits_are_topology_settings():
    top = dataclasses.replace(Topology.for_compose(1), confinement=Confinement(memory="3g", cpus="1.5", uid=20000))
    site = compose_dict(top)["services"]["site-a"]
    assert expand(site["mem_limit"]) == "3g" and expand(site["cpus"]) == "1.5"
    assert expand(site["user"]) == f"20000:{IMAGE_UID}"
    assert expand(site["mem_limit"], {"MOME_SITE_MEMORY": "16g"}) == "16g"  # a host's .env overrides it
