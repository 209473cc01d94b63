"""The layout of a saved carclf model: the flavor's name and the files its ``data`` folder holds.

::

    MLmodel                      carclf + python_function flavors, signature, input example
    data/model.keras             the fused float32 inference network (Keras 3 format, loads with safe_mode=True)
    data/classes.json            class index -> name, as a JSON list
    data/preprocessing.json      PreprocessSettings (as the HDF5 data was built) + inference_precision
    data/int8.json               only with calibration data: the int8 validation report (carclf_flavor.int8_build)
    data/model_int8.xml, .bin    only when int8 passed validation: the int8 network (OpenVINO IR, carclf_flavor.int8_runtime)
    code/carclf_flavor/          this package: the model loads with only requirements.txt installed
    requirements.txt, conda.yaml, python_env.yaml, serving_input_example.json, input_example.json
    carclf-manifest.json         written last: the SHA-256 of every other file (carclf_flavor.manifest)
    carclf-model.sig             only when saved with a signing key: OpenSSF model-signing signature of the folder

Nothing is unpickled at load time: the network is a ``.keras`` file loaded with ``safe_mode=True`` and every
other piece is JSON. The folder still holds code: MLflow imports ``code/carclf_flavor`` to load the model, so
only a folder whose manifest and signature were checked is trusted. These names are read back from models
saved by every earlier version: never rename them.
"""

FLAVOR_NAME = "carclf"
DATA_SUBPATH = "data"
MODEL_FILE = "model.keras"
CLASSES_FILE = "classes.json"
PREPROCESSING_FILE = "preprocessing.json"
MANIFEST_FILE = "carclf-manifest.json"
SIGNATURE_FILE = "carclf-model.sig"
