"""Every command README.md shows is executed here, in README order, with tiny sizes.

The commands are read from README.md itself (every ```bash block, plus the inline `mlflow run . --env-manager
local -...` commands of the prose). COVERAGE maps each one to the test that runs it; a README command that
no entry matches fails `test_every_readme_command_is_covered`, so a new command cannot go untested.
Real-data sizes are turned into tiny ones by named parameter substitutions (`adapt`); everything is written
under one temporary folder (own SQLite store, experiment artifact location, deployment home).
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import cv2
import numpy as np
import pytest

from carclf.compute.ports import free_port
from carclf.deployment.local_server import wait_until_serving
from conftest import REPO_ROOT
from helpers_deploy import clean_azure_env, kill_servers_of_store, require_unshare
from helpers_processes import stop_process_group

README = REPO_ROOT / "README.md"
VENV_BIN = pathlib.Path(sys.executable).parent
AZUREML_TARGET = (
    "azureml://westeurope.api.azureml.ms/mlflow/v1.0/subscriptions/00000000-0000-0000-0000-000000000000"
    "/resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/ws"
)
SAMPLE_CLASSES = 4

# The whole-pipeline sizes: `make run` gets them as MLFLOW_RUN_ARGS, and the README's real Stanford
# configuration is cut down to exactly the same values, so its run must reuse every finished step.
TINY_MAIN = {
    "image_size": "32",
    "depth": "18",
    "width": "0.125",
    "weights": "none",
    "epochs": "1",
    "head_epochs": "1",
    "copies": "1",
}
# Kept as README writes them in the Stanford command (they do not change the cost).
STANFORD_KEPT = {"optimizer": "sgd", "learning_rate": "0.001"}


# ------------------------------------------------------------------------------------------ README parsing
def readme_commands(text: str | None = None) -> list[str]:
    """Commands in README order: each non-comment line of a ```bash block, then inline `mlflow run . ...`."""
    text = README.read_text() if text is None else text
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            commands.append(re.split(r"\s{2,}#", line, maxsplit=1)[0].rstrip())
    # Prose commands with parameters, e.g. "targets it by default: `mlflow run . --env-manager local -e deploy ...`".
    for inline in re.findall(r"`(mlflow run \. --env-manager local -[^`]+)`", text):
        if inline not in commands:
            commands.append(inline)
    return commands


# regex (full match) -> name of the test that executes the command
COVERAGE = [
    (r"make run", "test_make_run"),
    (r"make test", "test_make_test_is_what_ci_runs"),
    (r"mlflow ui --backend-store-uri sqlite:///mlflow\.db", "test_mlflow_ui"),
    (r"mlflow run \. --env-manager local -P data_dir=/data/stanford_cars .*", "test_real_configuration_reuses_steps"),
    (
        r"mlflow run \. --env-manager local -e (preprocess|augment|train|evaluate) (?!.*/Volumes/).*",
        "test_my_cars_step_by_step",
    ),
    (
        r"mlflow run \. --env-manager local -e (preprocess|train) .*/Volumes/main/default/cars/.*",
        "test_databricks_volume",
    ),
    (r"mlflow run \. --env-manager local -e tune .*", "test_tune_step"),
    (r"mlflow models serve -m models:/carclf/1 --env-manager local -p 5000", "test_serving"),
    (r"python -m entry_points\.score --url http://127\.0\.0\.1:5000 car\.jpg .*", "test_serving"),
    (r"\{ printf .*; base64 -w0 car\.jpg; printf .* > req\.json", "test_serving"),
    (r"curl -s http://127\.0\.0\.1:5000/invocations .*--data-binary @req\.json", "test_serving"),
    (r"python -m entry_points\.score --spark .*", "test_spark_batch_scoring"),
    (
        r"mlflow run \. --env-manager local -e deploy (?!.*kind=batch).*-P target=\$AZUREML_TARGET .*",
        "test_azure_without_credentials",
    ),
    (r"mlflow run \. --env-manager local -e deploy .*-P kind=batch .*", "test_azure_batch_without_credentials"),
    (
        r"python -m entry_points\.score --azure-batch-endpoint https://\S+/jobs --input azureml://\S+",
        "test_azure_batch_without_credentials",
    ),
    (r"mlflow deployments create -t azureml .*", "test_azure_without_credentials"),
    (r"python -m entry_points\.score --azure-endpoint https://\S+/score car\.jpg .*", "test_azure_endpoint_client"),
    (r"mlflow deployments \w+ -t carclf-local.*", "test_carclf_local_lifecycle"),
    (
        r"mlflow run \. --env-manager local -e deploy -P model_uri=models:/carclf/1 -P name=cars",
        "test_deploy_entry_point_local",
    ),
    (r"mlflow run \. --env-manager local -P deploy_target=carclf-local", "test_main_with_deploy_target"),
    (r"mlflow run \. --env-manager local -e demo -P model_uri=models:/carclf/1", "test_demo_page"),
    (r"openssl ec.*", "test_signing_commands"),
    (r"carclf verify .*", "test_signing_commands"),
]


def covering(command: str) -> list[str]:
    return [test for pattern, test in COVERAGE if re.fullmatch(pattern, command)]


def commands_for(test_name: str) -> list[str]:
    found = [c for c in readme_commands() if test_name in covering(c)]
    assert found, f"README no longer shows a command for {test_name}"
    return found


def adapt(
    command: str,
    params: dict | None = None,
    add: dict | None = None,
    tokens: dict | None = None,
    text: dict | None = None,
) -> list[str]:
    """README command -> argv. ``text``: literal replacements; ``params``: values of existing `-P key=value`
    (each must be there: the README still shows the real size we cut down); ``tokens``: whole-token
    replacements; ``add``: extra `-P key=value`."""
    for old, new in (text or {}).items():
        assert old in command, f"{old!r} not in README command {command!r}"
        command = command.replace(old, new)
    argv = shlex.split(command)
    params, tokens, seen = dict(params or {}), dict(tokens or {}), set()
    for i, token in enumerate(argv):
        if i and argv[i - 1] == "-P":
            key, _, _value = token.partition("=")
            if key in params:
                argv[i] = f"{key}={params[key]}"
                seen.add(key)
        elif token in tokens:
            argv[i] = tokens[token]
            seen.add(token)
    missing = (set(params) | set(tokens)) - seen
    assert not missing, f"README command {command!r} no longer has {sorted(missing)}"
    for key, value in (add or {}).items():
        argv += ["-P", f"{key}={value}"]
    return argv


# ------------------------------------------------------------------------------------------ the scenario
class World:
    """State shared by the scenario tests: one temporary folder, store, experiment and environment."""

    def __init__(self, root: pathlib.Path):
        import mlflow

        self.root = root
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        client = mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.experiment_id = client.create_experiment("readme", artifact_location=str(root / "artifacts"))
        self.deploy_home = root / "deploy"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "AZUREML_"))}
        self.env.update(
            MLFLOW_TRACKING_URI=self.uri,
            MLFLOW_REGISTRY_URI=self.uri,
            MLFLOW_EXPERIMENT_ID=self.experiment_id,
            CARCLF_DEPLOY_HOME=str(self.deploy_home),
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            MLFLOW_DISABLE_TELEMETRY="true",
            DO_NOT_TRACK="true",
            TF_CPP_MIN_LOG_LEVEL="2",
            PYTHONUNBUFFERED="1",
        )
        self.servers: list[subprocess.Popen] = []
        from carclf.data.sample_data import class_names, generate_sample_dataset

        self.sample = generate_sample_dataset(
            root / "sample",
            num_classes=SAMPLE_CLASSES,
            train_per_class=12,
            test_per_class=4,
            min_width=96,
            max_width=160,
        )
        self.class_names = class_names(SAMPLE_CLASSES)
        self.car_jpg = sorted((self.sample / "cars_test").glob("*.jpg"))[0]
        self.data = root / "data"
        self.main_params = {"data_dir": str(self.sample), "output_dir": str(self.data), **TINY_MAIN, **STANFORD_KEPT}

    def client(self):
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def run(self, argv, *, cwd=None, timeout=600, env=None, ok=True, shell=False) -> subprocess.CompletedProcess:
        result = subprocess.run(
            argv,
            cwd=cwd or self.root,
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            shell=shell,
            executable="/bin/bash" if shell else None,
        )
        if ok:
            assert result.returncode == 0, describe(argv, result)
        return result

    def start_server(self, argv, log_name: str) -> subprocess.Popen:
        log = open(self.root / log_name, "wb")
        process = subprocess.Popen(
            argv,
            cwd=self.root,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        process.log_path = self.root / log_name
        self.servers.append(process)
        return process

    def stop(self, process: subprocess.Popen) -> None:
        stop_process_group(process)

    def cleanup(self) -> None:
        from carclf.deployment import local_target

        for process in self.servers:
            self.stop(process)
        for record_file in self.deploy_home.glob("*.json") if self.deploy_home.is_dir() else []:
            try:
                record = json.loads(record_file.read_text())
                local_target.stop_process_group(record["pid"], record.get("pid_start_time"), grace_s=5.0)
            except (ValueError, KeyError, OSError):
                pass
        kill_servers_of_store(self.uri)

    def versions(self) -> list[int]:
        return sorted(int(v.version) for v in self.client().search_model_versions("name = 'carclf'"))

    def last_main_run(self):
        runs = self.client().search_runs(
            [self.experiment_id],
            filter_string="tags.`mlflow.project.entryPoint` = 'main'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        assert runs, "no main run found"
        return runs[0]


def describe(argv, result) -> str:
    shown = argv if isinstance(argv, str) else shlex.join(map(str, argv))
    return (
        f"`{shown}` exited {result.returncode}\n--- stdout (tail)\n{result.stdout[-4000:]}\n"
        f"--- stderr (tail)\n{result.stderr[-6000:]}"
    )


def wait_http(url: str, process: subprocess.Popen, seconds: float = 240) -> None:
    parts = urllib.parse.urlsplit(url)
    problem = wait_until_serving(process, f"{parts.scheme}://{parts.netloc}", seconds, path=parts.path or "/")
    if problem:
        pytest.fail(f"{problem}; log tail:\n{process.log_path.read_text(errors='replace')[-4000:]}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    state = World(tmp_path_factory.mktemp("readme"))
    yield state
    state.cleanup()


# ------------------------------------------------------------------------------------------ coverage
def test_readme_parser_reads_blocks_comments_and_inline_commands():
    text = (
        "x\n```bash\nmake run    # builds\n\n# a comment\nmlflow ui  --x\n```\n```\nnot bash\n```\n"
        "prose `mlflow run . --env-manager local -P a=b` end\n"
    )
    assert readme_commands(text) == ["make run", "mlflow ui  --x", "mlflow run . --env-manager local -P a=b"]


def test_every_readme_command_is_covered():
    commands = readme_commands()
    assert len(commands) >= 20, commands
    uncovered = [c for c in commands if not covering(c)]
    assert not uncovered, f"README commands without a test (add them to COVERAGE): {uncovered}"
    stale = [p for p, _ in COVERAGE if not any(re.fullmatch(p, c) for c in commands)]
    assert not stale, f"COVERAGE entries matching no README command: {stale}"
    tests = {name for name, obj in globals().items() if name.startswith("test_") and callable(obj)}
    assert {t for _, t in COVERAGE} <= tests


# ------------------------------------------------------------------------------------------ the scenario, in README order
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_make_run(world):
    """`make run` is `$(BIN)/mlflow run . --env-manager local $(MLFLOW_RUN_ARGS)`: run exactly that (calling make
    would rebuild .venv), with tiny sizes as MLFLOW_RUN_ARGS."""
    (command,) = commands_for("test_make_run")
    make_line = [
        ln.strip()
        for ln in (REPO_ROOT / "Makefile").read_text().splitlines()
        if ln.strip().startswith("$(BIN)/mlflow run")
    ]
    assert make_line == ["$(BIN)/mlflow run . --env-manager local $(MLFLOW_RUN_ARGS)"], make_line
    argv = ["mlflow", "run", ".", "--env-manager", "local"]
    for key, value in world.main_params.items():
        argv += ["-P", f"{key}={value}"]
    result = world.run(argv, cwd=REPO_ROOT, timeout=1100)
    assert world.versions() == [1]
    parent = world.last_main_run()
    assert parent.info.status == "FINISHED"
    for step in ("preprocess", "augment", "train", "evaluate"):
        child = world.client().get_run(parent.data.tags[f"carclf.child_run.{step}"])
        assert child.info.status == "FINISHED", step
    assert "evaluate_test_top1" in parent.data.metrics
    printed = result.stdout + result.stderr
    assert "mlflow models serve -m models:/carclf/1 --env-manager local -p 5000" in printed
    assert "python -m entry_points.score --url http://127.0.0.1:5000" in printed
    assert "mlflow ui" in printed


def test_make_test_is_what_ci_runs():
    """`make test` is the command running this very suite: not executed here, but CI must run it."""
    commands_for("test_make_test_is_what_ci_runs")
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, re.M), ci
    assert re.search(r"^test:.*\n\t\$\(BIN\)/python -m pytest", (REPO_ROOT / "Makefile").read_text(), re.M)


@pytest.mark.slow
def test_mlflow_ui(world):
    (command,) = commands_for("test_mlflow_ui")
    port = free_port()
    argv = adapt(command, tokens={"sqlite:///mlflow.db": world.uri}) + ["--host", "127.0.0.1", "--port", str(port)]
    ui_dir = world.root / "ui"
    ui_dir.mkdir()
    server = world.start_server(argv, "mlflow-ui.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/", server, seconds=180)
    finally:
        world.stop(server)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_configuration_reuses_steps(world):
    (command,) = commands_for("test_real_configuration_reuses_steps")
    argv = adapt(command, params={"data_dir": str(world.sample), **TINY_MAIN}, add={"output_dir": str(world.data)})
    world.run(argv, cwd=REPO_ROOT, timeout=800)
    parent = world.last_main_run()
    assert parent.info.status == "FINISHED"
    reused = {k[len("carclf.reused_run_") :] for k in parent.data.tags if k.startswith("carclf.reused_run_")}
    assert reused == {"preprocess", "augment", "train", "evaluate"}, parent.data.tags
    assert world.versions() == [1], "a reused train step must not register a new version"


def _write_my_cars(root: pathlib.Path, classes=3, per_class=10) -> list[str]:
    """A folder-per-class dataset of real JPEG photos (the generator's renderer, re-encoded with Pillow)."""
    import numpy as np
    from PIL import Image

    from carclf.data.sample_data import render_photo

    names = [f"Model {chr(65 + c)} 20{10 + c}" for c in range(classes)]
    for class_id, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            image, _box = render_photo(class_id, np.random.default_rng([7, class_id, i]), 96, 160)
            Image.fromarray(image).save(folder / f"{i:03d}.jpg", quality=90)
    return names


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_my_cars_step_by_step(world):
    commands = commands_for("test_my_cars_step_by_step")
    assert [re.search(r"-e (\w+)", c).group(1) for c in commands] == ["preprocess", "augment", "train", "evaluate"]
    _write_my_cars(world.root / "my_cars")
    processed = world.root / "my_data" / "processed"
    where = {"data/processed": str(processed)}
    preprocess, augment, train, evaluate = commands
    steps = [
        adapt(preprocess, text=where, params={"data_dir": str(world.root / "my_cars"), "image_size": "32"}),
        adapt(augment, text=where, params={"copies": "1"}),
        adapt(
            train,
            text=where,
            params={"depth": "18", "weights": "none"},
            add={
                "width": "0.125",
                "epochs": "1",
                "head_epochs": "0",
                "batch_size": "8",
                "checkpoint_dir": str(world.root / "my_checkpoints"),
            },
        ),
        # In README order this is the first model a newcomer trains (version 1); here make run registered 1.
        adapt(evaluate, text=where, params={"model_uri": "models:/carclf/2"}),
    ]
    for argv in steps:
        world.run(argv, cwd=REPO_ROOT, timeout=900)
    for split in ("train", "val", "test", "train_aug"):
        assert (processed / f"{split}.h5").is_file(), split
    assert world.versions() == [1, 2]
    evaluate_run = world.client().search_runs(
        [world.experiment_id],
        filter_string="tags.`mlflow.project.entryPoint` = 'evaluate'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    assert evaluate_run.data.params["model_uri"] == "models:/carclf/2"
    assert {"test_top1", "test_top5", "test_macro_f1"} <= set(evaluate_run.data.metrics)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_databricks_volume(world, tmp_path):
    """The Databricks commands with the Volume a real FUSE mount that takes only sequential writes: the splits land
    there complete and train registers the Unity Catalog style name from them."""
    from helpers_flavor import unity_catalog_signature_check
    from helpers_seqfs import fuse_missing, sequential_only_mount

    if reason := fuse_missing():
        pytest.skip(reason)
    preprocess, train = commands_for("test_databricks_volume")
    with sequential_only_mount(tmp_path / "volume") as volume:
        where = {"/Volumes/main/default/cars": str(volume)}
        world.run(
            adapt(preprocess, text=where, params={"data_dir": str(world.sample)}, add={"image_size": "32"}),
            cwd=REPO_ROOT,
            timeout=900,
        )
        landed = {p.name for p in (volume / "processed").iterdir()}
        assert {"train.h5", "val.h5", "test.h5"} <= landed and not [n for n in landed if n.startswith(".")], landed
        world.run(
            adapt(
                train,
                text=where,
                add={
                    "depth": "18",
                    "width": "0.125",
                    "epochs": "1",
                    "head_epochs": "0",
                    "batch_size": "8",
                    "weights": "none",
                    "checkpoint_dir": str(volume / "checkpoints"),
                },
            ),
            cwd=REPO_ROOT,
            timeout=900,
        )
    versions = world.client().search_model_versions("name = 'main.default.carclf'")
    assert [str(v.version) for v in versions] == ["1"]
    unity_catalog_signature_check("models:/main.default.carclf/1", world.uri)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tune_step(world):
    """The README's tune command on tiny splits of the sample data: 2 trials, best registered under another name."""
    from entry_points.preprocess import preprocess

    (command,) = commands_for("test_tune_step")
    splits = preprocess(
        data_dir=str(world.sample), output_dir=str(world.root / "tune_data"), image_size=32, crop="bbox", workers=1
    )
    folder = str(pathlib.Path(splits["train"]).parent)
    space = world.root / "tiny_space.yaml"
    space.write_text(
        "depth: 18\nwidth: 0.125\nepochs: 1\nhead_epochs: 0\nbatch_size: 8\nonline_augment: false\n"
        "learning_rate: {low: 1.0e-3, high: 1.0e-2, log: true}\n"
    )
    versions = world.versions()
    world.run(
        adapt(
            command,
            text={"data/processed/train_aug.h5": str(splits["train"]), "data/processed": folder},
            params={"trials": "2", "parallel": "2", "space": str(space)},
            add={"spark_master": "local[2]", "registered_model_name": "carclf-tuned"},
        ),
        cwd=REPO_ROOT,
        timeout=900,
    )
    champion = world.client().get_model_version_by_alias("carclf-tuned", "champion")
    trial = world.client().get_run(champion.run_id)
    assert trial.info.status == "FINISHED" and trial.data.params["width"] == "0.125"
    assert world.versions() == versions  # the pipeline's own model is untouched


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_serving(world):
    serve, score, write_body, curl = commands_for("test_serving")
    port = str(free_port())
    server = world.start_server(adapt(serve, tokens={"5000": port}) + ["-h", "127.0.0.1"], "serve.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", server, seconds=300)
        car = str(world.car_jpg)
        result = world.run(adapt(score, text={":5000": f":{port}"}, tokens={"car.jpg": car}), timeout=180)
        assert any(name in result.stdout for name in world.class_names), describe(score, result)

        if shutil.which("curl") is None or shutil.which("base64") is None:
            pytest.skip("curl/base64 not installed: the README curl command cannot run here")
        # A photo over 1 MB: the README's body-in-a-file form must not hit the 128 KiB argument cap.
        big = world.root / "big_car.jpg"
        rng = np.random.default_rng(3)
        noisy = rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)
        big.write_bytes(cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, 98])[1].tobytes())
        assert big.stat().st_size > 1_000_000
        line = write_body.replace("car.jpg", shlex.quote(str(big))) + " && " + curl.replace(":5000", f":{port}")
        result = world.run(["bash", "-c", line + ' -w "\\n%{http_code}"'], timeout=180)
        body, _, status = result.stdout.rpartition("\n")
        assert status == "200", describe(line, result)
        predictions = json.loads(body)["predictions"]
        assert len(predictions) == 1 and predictions[0]["label"] in world.class_names
        assert 0.0 <= predictions[0]["prob"] <= 1.0 and len(json.loads(predictions[0]["top_k"])) == 3
    finally:
        world.stop(server)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_page(world):
    """The README's demo command serves the page and answers for a photo (the browser tests: test_demo.py)."""
    (command,) = commands_for("test_demo_page")
    port = free_port()
    server = world.start_server(adapt(command, tokens={".": str(REPO_ROOT)}, add={"port": port}), "demo.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/", server, seconds=300)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=10) as response:
            info = json.loads(response.read())
        assert info["name"] == "carclf" and info["version"] == "1" and info["classes"] == world.class_names
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/predict?name=car.jpg", data=world.car_jpg.read_bytes(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        assert answer["label"] in world.class_names and answer["heatmap"].startswith("data:image/jpeg;base64,")
    finally:
        world.stop(server)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_spark_batch_scoring(world):
    (command,) = commands_for("test_spark_batch_scoring")
    photos = world.root / "photos"
    photos.mkdir()
    for photo in sorted((world.sample / "cars_test").glob("*.jpg"))[:4]:
        shutil.copy(photo, photos / photo.name)
    world.run(adapt(command), cwd=world.root, timeout=800)  # photos/ and scores.parquet relative to the cwd
    import pandas as pd

    scores = pd.read_parquet(world.root / "scores.parquet")
    assert len(scores) == 4 and set(scores["label"]) <= set(world.class_names), scores


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_azure_batch_without_credentials(world):
    """Both batch commands as a reader pastes them: without a login, one line naming what to do, in seconds."""
    require_unshare("the Azure commands")
    deploy_step, start_job = commands_for("test_azure_batch_without_credentials")
    home = world.root / "empty-home-batch"
    home.mkdir()
    env = clean_azure_env(home)
    keep = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_DISABLE_TELEMETRY")
    env.update({k: world.env[k] for k in keep}, AZUREML_TARGET=AZUREML_TARGET, PYTHONPATH=str(REPO_ROOT))
    for command in (deploy_step, start_job):
        result = world.run(["unshare", "-n", "bash", "-c", command], cwd=REPO_ROOT, env=env, timeout=60, ok=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0, describe(command, result)
        errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
        assert any("no Azure credentials found" in ln and "az login" in ln for ln in errors), describe(command, result)


def test_azure_without_credentials(world):
    require_unshare("the Azure commands")
    run_step, plain_cli = commands_for("test_azure_without_credentials")
    home = world.root / "empty-home"
    home.mkdir()
    env = clean_azure_env(home)
    env.update(
        {
            k: world.env[k]
            for k in (
                "MLFLOW_TRACKING_URI",
                "MLFLOW_REGISTRY_URI",
                "MLFLOW_EXPERIMENT_ID",
                "MLFLOW_DISABLE_TELEMETRY",
                "TF_CPP_MIN_LOG_LEVEL",
                "PYTHONUNBUFFERED",
            )
        }
    )
    env["AZUREML_TARGET"] = AZUREML_TARGET
    # `$AZUREML_TARGET` is expanded by the shell, as when a reader pastes the line.
    result = world.run(["unshare", "-n", "bash", "-c", run_step], cwd=REPO_ROOT, env=env, timeout=60, ok=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, describe(run_step, result)
    errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert any("no Azure credentials found" in ln and "az login" in ln for ln in errors), describe(run_step, result)

    argv = adapt(
        plain_cli,
        tokens={
            "deploy-config-file=deploy/managed.json": f"deploy-config-file={REPO_ROOT / 'deploy' / 'managed.json'}"
        },
    )
    azure_dir = world.root / "azure-cli"
    azure_dir.mkdir()
    result = world.run(["unshare", "-n", *argv], cwd=azure_dir, env=env, timeout=120, ok=False)
    assert result.returncode != 0, describe(argv, result)
    assert "is created" not in result.stdout, describe(argv, result)


def test_azure_endpoint_client(world, tmp_path):
    """The README's Azure client command, pointed at the stand-in endpoint of test_score_client (127.0.0.1),
    which checks Azure's body shape, the bearer key and the deployment header (the real Azure scorer is
    tested with Azure's own script elsewhere)."""
    import http.server
    import threading

    from test_score_client import KEY, StandIn

    (command,) = commands_for("test_azure_endpoint_client")
    StandIn.requests_seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = re.search(r"https://\S+/score", command).group(0)
        argv = adapt(
            command, tokens={url: f"http://127.0.0.1:{server.server_address[1]}/score", "car.jpg": str(world.car_jpg)}
        )
        env = {**world.env, "AZUREML_ENDPOINT_KEY": KEY}
        result = world.run(
            [sys.executable if argv[0] == "python" else argv[0], *argv[1:]], cwd=REPO_ROOT, env=env, timeout=120
        )
    finally:
        server.shutdown()
        server.server_close()
    (seen,) = StandIn.requests_seen
    assert seen["authorization"] == f"Bearer {KEY}" and seen["deployment"] == "green"
    assert base64.b64decode(seen["body"]["input_data"]["data"][0][0]) == world.car_jpg.read_bytes()
    assert seen["body"]["params"] == {"top_k": 3} and "Car " in result.stdout


def _request_body(photo: pathlib.Path) -> dict:
    # Not the Serving section's `dataframe_split` body README points at: `mlflow deployments predict` reads
    # --input-path with pandas.read_json, which turns that body into a frame with columns `dataframe_split`
    # and `params` (HTTP 400). Column-oriented JSON is what the CLI accepts (reported to the lead).
    return {"image": [base64.b64encode(photo.read_bytes()).decode("ascii")]}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_carclf_local_lifecycle(world):
    commands = commands_for("test_carclf_local_lifecycle")
    verbs = [shlex.split(c)[2] for c in commands]
    assert verbs == ["create", "predict", "update", "get", "list", "delete"], verbs
    (world.root / "req.json").write_text(json.dumps(_request_body(world.car_jpg)))
    outputs = {}
    try:
        for verb, command in zip(verbs, commands):
            outputs[verb] = world.run(adapt(command), timeout=400).stdout
            if verb == "create":
                first = json.loads((world.deploy_home / "cars.json").read_text())
                assert first["model_uri"] == "models:/carclf/1"
            if verb == "predict":
                predictions = json.loads(outputs[verb])
                predictions = predictions.get("predictions", predictions)
                assert predictions[0]["label"] in world.class_names, outputs[verb]
            if verb == "update":
                record = json.loads((world.deploy_home / "cars.json").read_text())
                assert record["model_uri"] == "models:/carclf/2" and record["pid"] != first["pid"]
    finally:
        world.run(["mlflow", "deployments", "delete", "-t", "carclf-local", "--name", "cars"], ok=False)
    assert "healthy" in outputs["get"] and "unhealthy" not in outputs["get"], outputs["get"]
    assert "cars" in outputs["list"]
    assert not (world.deploy_home / "cars.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_deploy_entry_point_local(world):
    (command,) = commands_for("test_deploy_entry_point_local")
    try:
        world.run(adapt(command), cwd=REPO_ROOT, timeout=600)
        record = json.loads((world.deploy_home / "cars.json").read_text())
        assert record["model_uri"] == "models:/carclf/1"
        get = world.run(["mlflow", "deployments", "get", "-t", "carclf-local", "--name", "cars"], timeout=120)
        assert "healthy" in get.stdout and "unhealthy" not in get.stdout
    finally:
        world.run(["mlflow", "deployments", "delete", "-t", "carclf-local", "--name", "cars"], ok=False)
    assert not (world.deploy_home / "cars.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_main_with_deploy_target(world):
    (command,) = commands_for("test_main_with_deploy_target")
    argv = adapt(command, add={k: v for k, v in world.main_params.items()})
    try:
        world.run(argv, cwd=REPO_ROOT, timeout=800)
        parent = world.last_main_run()
        reused = {k[len("carclf.reused_run_") :] for k in parent.data.tags if k.startswith("carclf.reused_run_")}
        assert reused == {"preprocess", "augment", "train", "evaluate"}, parent.data.tags
        deploy_run = world.client().get_run(parent.data.tags["carclf.child_run.deploy"])
        assert deploy_run.info.status == "FINISHED"
        record = json.loads((world.deploy_home / "carclf-sample.json").read_text())
        assert record["model_uri"] == "models:/carclf/1"
    finally:
        world.run(["mlflow", "deployments", "delete", "-t", "carclf-local", "--name", "carclf-sample"], ok=False)
    assert not (world.deploy_home / "carclf-sample.json").exists()


def test_signing_commands(tmp_path, monkeypatch):
    """The README's key pair signs a model (CARCLF_SIGNING_KEY, as train picks it up) that `carclf verify` accepts
    with the public key, and refuses once a line is appended to its shipped code."""
    import carclf_flavor
    from helpers_flavor import CLASS_NAMES, build_tiny_resnet

    make_private, make_public, verify_command = commands_for("test_signing_commands")
    for command in (make_private, make_public):
        subprocess.run(shlex.split(command), cwd=tmp_path, check=True, capture_output=True, timeout=60)
    monkeypatch.setenv("CARCLF_SIGNING_KEY", str(tmp_path / "signing-key.pem"))
    carclf_flavor.save_model(build_tiny_resnet(), tmp_path / "model", CLASS_NAMES)
    argv = adapt(
        verify_command,
        text={"carclf verify": f"{sys.executable} -m entry_points.cli verify"},
        tokens={"models:/carclf/1": str(tmp_path / "model")},
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    good = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert good.returncode == 0 and "signature good for signing-key.pub.pem" in good.stdout, good
    with open(tmp_path / "model" / "code" / "carclf_flavor" / "__init__.py", "a") as handle:
        handle.write("print('ran on load')\n")
    bad = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad
    assert "code/carclf_flavor/__init__.py changed since it was saved" in bad.stderr
