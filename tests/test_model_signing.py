"""Signed models: save_model writes a manifest of every file and signs the folder (OpenSSF model-signing, EC key);
`carclf verify`, score --spark, demo and carclf-local refuse a folder that was changed since it was signed."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import carclf_flavor
from carclf.compute.ports import free_port
from carclf.verification.model_check import ModelVerificationError, verified_model_uri
from carclf_flavor.layout import MANIFEST_FILE, SIGNATURE_FILE
from carclf_flavor.manifest import write_manifest
from conftest import REPO_ROOT
from entry_points.cli import verify
from helpers_flavor import CLASS_NAMES, build_tiny_resnet


def _write_key_pair(folder: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    private, public = _write_key_pair(folder, "signer")
    _, other_public = _write_key_pair(folder, "other")
    return {"private": private, "public": public, "other_public": other_public}


@pytest.fixture(scope="module")
def signed_model(tmp_path_factory, keys) -> pathlib.Path:
    path = tmp_path_factory.mktemp("signed") / "model"
    carclf_flavor.save_model(build_tiny_resnet(), path, CLASS_NAMES, signing_key=keys["private"])
    return path


@pytest.fixture
def model_copy(signed_model, tmp_path) -> pathlib.Path:
    copy = tmp_path / "copy"
    shutil.copytree(signed_model, copy)
    return copy


def _append_line_to_flavor_code(model: pathlib.Path) -> None:
    with open(model / "code" / "carclf_flavor" / "__init__.py", "a") as handle:
        handle.write("open('/tmp/owned', 'w').write('ran on load')\n")


def _flip_a_byte_of_the_network(model: pathlib.Path) -> None:
    network = model / "data" / "model.keras"
    data = bytearray(network.read_bytes())
    data[len(data) // 2] ^= 0x01
    network.write_bytes(bytes(data))


def _tamper_and_rewrite_manifest(model: pathlib.Path) -> None:
    _append_line_to_flavor_code(model)
    write_manifest(model)  # the manifest agrees again: only the signature can tell


TAMPERING = {
    "appended line": (_append_line_to_flavor_code, "code/carclf_flavor/__init__.py changed since it was saved"),
    "changed byte": (_flip_a_byte_of_the_network, "data/model.keras changed since it was saved"),
    "added file": (lambda m: (m / "data" / "extra.py").write_text("x = 1\n"), "data/extra.py added"),
    "added pyc": (
        lambda m: (
            (m / "code" / "carclf_flavor" / "__pycache__").mkdir()
            or (m / "code" / "carclf_flavor" / "__pycache__" / "load.cpython-311.pyc").write_bytes(b"\0" * 16)
        ),
        "code/carclf_flavor/__pycache__/load.cpython-311.pyc added",
    ),
    "added git file": (lambda m: (m / ".gitignore").write_text("*\n"), ".gitignore added"),
    "removed file": (lambda m: (m / "data" / "classes.json").unlink(), "data/classes.json missing"),
    "manifest rewritten": (
        _tamper_and_rewrite_manifest,
        f"code/carclf_flavor/__init__.py changed since it was signed ({SIGNATURE_FILE})",
    ),
}


def test_save_model_writes_a_manifest_and_a_signature_that_verify(signed_model, keys):
    names = {p.name for p in signed_model.iterdir()}
    assert {MANIFEST_FILE, SIGNATURE_FILE} <= names
    line = verify(str(signed_model), keys["public"])
    assert line.startswith(f"verified {signed_model}: ") and f"signature good for {keys['public']}" in line
    assert "NOT checked" in verify(str(signed_model))  # signed, but no key given: said so


@pytest.mark.parametrize("tampering", sorted(TAMPERING))
def test_tampered_models_are_refused_in_one_line(tampering, model_copy, keys):
    tamper, expected = TAMPERING[tampering]
    tamper(model_copy)
    with pytest.raises(ModelVerificationError) as caught:
        verify(str(model_copy), keys["public"])
    message = str(caught.value)
    assert message.startswith(f"{model_copy}: ") and expected in message and "\n" not in message, message


def test_wrong_key_unsigned_and_earlier_models_are_refused(model_copy, keys, tmp_path):
    with pytest.raises(ModelVerificationError, match=f"{SIGNATURE_FILE} was not made with the key"):
        verify(str(model_copy), keys["other_public"])
    (model_copy / SIGNATURE_FILE).unlink()
    assert verify(str(model_copy)).endswith(", unsigned")
    with pytest.raises(ModelVerificationError, match=f"not signed \\(no {SIGNATURE_FILE}\\)"):
        verify(str(model_copy), keys["public"])
    (model_copy / MANIFEST_FILE).unlink()  # as saved by carclf 0.3.0: it still loads, but cannot be verified
    for key in (None, keys["public"]):
        with pytest.raises(ModelVerificationError, match=f"no manifest \\({MANIFEST_FILE}\\)"):
            verify(str(model_copy), key)
    assert carclf_flavor.load_model(str(model_copy)).class_names == CLASS_NAMES
    with pytest.raises(ValueError, match="signing_key: .* is not a file"):
        carclf_flavor.save_model(build_tiny_resnet(), tmp_path / "never", CLASS_NAMES, signing_key=tmp_path / "none")
    assert not (tmp_path / "never").exists()


def test_cli_exit_codes_and_one_line(model_copy, keys):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "entry_points.cli", "verify", *args],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO_ROOT,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        )

    good = run(str(model_copy), "--public-key", str(keys["public"]))
    assert good.returncode == 0 and good.stdout.startswith("verified ") and good.stdout.count("\n") == 1, good
    _append_line_to_flavor_code(model_copy)
    bad = run(str(model_copy), "--public-key", str(keys["public"]))
    assert bad.returncode == 1 and bad.stdout == "", bad
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
    assert "code/carclf_flavor/__init__.py changed" in bad.stderr


def test_pyproject_names_the_carclf_command():
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["carclf"] == "entry_points.cli:main"
    assert any(r.startswith("model-signing") for r in project["dependencies"])


def test_logged_and_registered_models_verify(keys, monkeypatch):
    """log_model signs with $CARCLF_SIGNING_KEY (as train's logging does); what MLflow adds on the way (the
    registry's registered_model_meta on download) does not break the check."""
    import mlflow

    monkeypatch.setenv("CARCLF_SIGNING_KEY", str(keys["private"]))
    with mlflow.start_run():
        info = carclf_flavor.log_model(build_tiny_resnet(), "model", CLASS_NAMES, registered_model_name="cars")
    for uri in (info.model_uri, "models:/cars/1"):
        assert "signature good" in verify(uri, keys["public"])


def test_loaders_load_the_checked_copy_and_refuse_a_tampered_one(signed_model, model_copy, keys, monkeypatch):
    with verified_model_uri(str(signed_model), keys["public"]) as checked:
        assert checked != str(signed_model)
        assert carclf_flavor.load_model(checked).class_names == CLASS_NAMES
    assert not pathlib.Path(checked).exists()
    with verified_model_uri(str(signed_model)) as unchecked:  # no key configured: loaded as given
        assert unchecked == str(signed_model)

    _append_line_to_flavor_code(model_copy)
    from entry_points import demo as demo_module
    from entry_points import score as score_module

    monkeypatch.setenv("CARCLF_MODEL_PUBLIC_KEY", str(keys["public"]))
    assert demo_module.main(["--model-uri", str(model_copy), "--port", str(free_port())]) == 2
    assert score_module.main(["--spark", "--model-uri", str(model_copy), "--input-dir", ".", "--output", "o"]) == 2


def test_demo_and_score_print_one_line_for_a_tampered_model(model_copy, keys, capsys):
    from entry_points import demo as demo_module
    from entry_points import score as score_module

    _flip_a_byte_of_the_network(model_copy)
    key = str(keys["public"])
    assert demo_module.main(["--model-uri", str(model_copy), "--port", str(free_port()), "--public-key", key]) == 2
    demo_err = capsys.readouterr().err
    args = ["--spark", "--model-uri", str(model_copy), "--input-dir", ".", "--output", "o", "--public-key", key]
    assert score_module.main(args) == 2
    score_err = capsys.readouterr().err
    for err in (demo_err, score_err):
        assert err == f"error: {model_copy}: data/model.keras changed since it was saved ({MANIFEST_FILE})\n"


def test_carclf_local_refuses_a_tampered_model_and_serves_the_checked_copy(signed_model, model_copy, keys):
    from mlflow.deployments import get_deploy_client

    from carclf.deployment.local_config import DeploymentError

    client = get_deploy_client("carclf-local")
    home = pathlib.Path(os.environ["CARCLF_DEPLOY_HOME"])
    _append_line_to_flavor_code(model_copy)
    with pytest.raises(DeploymentError) as caught:
        client.create_deployment("cars", str(model_copy), config={"public_key": str(keys["public"])})
    assert str(caught.value) == (
        f"refusing to serve {model_copy}: code/carclf_flavor/__init__.py changed since it was saved ({MANIFEST_FILE})"
    )
    assert client.list_deployments() == [] and not any((home / "verified").glob("*"))

    created = client.create_deployment("cars", str(signed_model), config={"public_key": str(keys["public"])})
    try:
        assert created["healthy"], created
        copy = pathlib.Path(created["verified_copy"])
        from carclf.deployment.local_state import StateStore

        assert copy.is_dir() and str(copy) in " ".join(StateStore(home).read("cars")["command"])
        with pytest.raises(DeploymentError, match="refusing to serve .*changed since it was saved"):
            client.update_deployment("cars", str(model_copy))  # the key it was created with still applies
    finally:
        client.delete_deployment("cars")
    assert not copy.exists()
