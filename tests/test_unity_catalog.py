"""Unity Catalog's habits, offline: MLflow's own pre-upload signature check, three-level names, aliases, no stages.

``databricks-uc`` itself cannot be reached here; what its client checks locally before an upload
(``UcModelRegistryStore._validate_model_signature``) runs unchanged on the models carclf logs.
"""

import json

import numpy as np
import pandas as pd
import pytest

import carclf_flavor
from helpers_flavor import CLASS_NAMES, build_tiny_resnet, jpeg_bytes, unity_catalog_signature_check

UC_NAME = "main.default.carclf"
IMAGES = [jpeg_bytes(80, 60, seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def keras_model():
    return build_tiny_resnet(seed=3)


def test_logged_model_passes_the_unity_catalog_check_and_one_without_outputs_does_not(keras_model):
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import ModelSignature

    with mlflow.start_run():
        good = carclf_flavor.log_model(keras_model, "model", CLASS_NAMES, inference_precision="float32")
        inputs_only = carclf_flavor.log_model(
            keras_model,
            "inputs_only",
            CLASS_NAMES,
            inference_precision="float32",
            signature=ModelSignature(inputs=carclf_flavor.input_schema(), params=carclf_flavor.params_schema()),
        )
    unity_catalog_signature_check(good.model_uri)
    with pytest.raises(MlflowException, match="signature that includes only inputs"):
        unity_catalog_signature_check(inputs_only.model_uri)
    # Azure's no-code scorer samples every output column with pandas_types() at start-up.
    outputs = good.signature.outputs
    assert outputs.input_names() == ["label", "class_id", "prob", "top_k", "error"]
    sample = pd.DataFrame(columns=outputs.input_names()).astype(
        dict(zip(outputs.input_names(), outputs.pandas_types()))
    )
    assert list(sample.columns) == outputs.input_names()


def test_the_answer_matches_the_declared_output_schema(keras_model, tmp_path):
    """Every column the signature declares comes back, with values of its type (spark_udf relies on it)."""
    import base64

    import mlflow.pyfunc

    path = tmp_path / "model"
    carclf_flavor.save_model(keras_model, path, CLASS_NAMES, inference_precision="float32")
    model = mlflow.pyfunc.load_model(str(path))
    frame = pd.DataFrame({"image": [base64.b64encode(IMAGES[0]).decode(), "not base64!"]})
    for errors in ("raise", "coerce"):
        rows = frame if errors == "coerce" else frame.iloc[:1]
        answer = model.predict(rows, params={"errors": errors, "top_k": 2})
        assert list(answer.columns) == model.metadata.get_output_schema().input_names()
        good = answer.iloc[0]
        assert isinstance(good.label, str) and isinstance(good.class_id, (int, np.integer))
        assert isinstance(good.prob, float) and good.error is None
        assert [entry["label"] for entry in json.loads(good.top_k)][0] == good.label
    bad = answer.iloc[1]
    assert bad.label is None and bad.class_id is None and bad.top_k == "[]" and "not base64" in bad.error


def test_three_level_name_registers_and_loads_by_alias(keras_model):
    import mlflow
    from mlflow.tracking import MlflowClient

    from carclf.deployment.model_uri import resolve_model_uri

    with mlflow.start_run():
        info = carclf_flavor.log_model(
            keras_model, "model", CLASS_NAMES, inference_precision="float32", registered_model_name=UC_NAME
        )
    assert info.registered_model_version == 1
    MlflowClient().set_registered_model_alias(UC_NAME, "champion", "1")
    uri = f"models:/{UC_NAME}@champion"
    assert resolve_model_uri(uri) == f"models:/{UC_NAME}/1"
    unity_catalog_signature_check(uri)
    direct = carclf_flavor.load_model(uri).predict(IMAGES, top_k=2)
    served = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": IMAGES}), params={"top_k": 2})
    assert served.label.tolist() == [r["label"] for r in direct]
    assert [json.loads(t) for t in served.top_k] == [r["top_k"] for r in direct]


@pytest.mark.parametrize("uri", [f"models:/{UC_NAME}/Production", "models:/carclf/Staging"])
def test_stage_uris_are_refused_in_one_line_naming_aliases(uri):
    from carclf.deployment.errors import DeployError
    from carclf.deployment.model_uri import check_azure_model_uri, resolve_model_uri

    for call in (check_azure_model_uri, resolve_model_uri):
        with pytest.raises(DeployError) as info:
            call(uri)
        message = str(info.value)
        assert "names a stage" in message and "@<alias>" in message and "\n" not in message
