"""Score car photos with a served carclf model (REST) or a folder of photos on Spark (batch).

REST (a thin client of ``mlflow models serve``)::

    python -m entry_points.score --url http://127.0.0.1:5000 photo1.jpg photo2.png [--top-k 3]
        [--bbox x1,y1,x2,y2] [--json] [--batch-size 16]

Each batch is one POST to ``/invocations`` with the body MLflow's server expects
(``{"dataframe_split": {"columns": ["image", ...], "data": [["<base64>", ...]]}, "params": {"top_k": k}}``).

Azure ML managed online endpoint (the scoring URI; key from ``--key`` or ``AZUREML_ENDPOINT_KEY``)::

    python -m entry_points.score --azure-endpoint https://<endpoint>.<region>.inference.ml.azure.com/score \
        photo1.jpg [--deployment green] [--top-k 3] [--json]

The body is what Azure's no-code scoring script reads
(``{"input_data": {"columns": [...], "index": [...], "data": [[...]]}, "params": {"top_k": k}}``), sent with
``Authorization: Bearer <key>`` (and ``azureml-model-deployment: <name>`` to score one deployment alone, e.g.
a new one still at 0% traffic). The output is the same as with ``--url``; a photo the model could not read
comes back with its ``error`` text (deployments made by ``deploy`` score with ``errors=coerce``).

Spark (``mlflow.pyfunc.spark_udf`` on a local Spark)::

    python -m entry_points.score --spark --model-uri models:/carclf/1 --input-dir photos/ --output scores.parquet

Bad images do not stop a Spark job: they get a null prediction and an ``error`` text (``errors=coerce``).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Sequence

from carclf.cli.cli_args import parse_int
from carclf.cli.step_config import OneLineErrorParser, add_arguments, config_from_args, param

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# spark_udf result: one struct per image. class_id/prob are doubles because spark_udf casts a struct field
# with numpy (a None among ints cannot be cast to int64); they become long/double with nulls afterwards.
SPARK_RESULT_TYPE = (
    "label string, class_id double, prob double, top_k array<struct<label: string, prob: double>>, error string"
)


class ScoringError(RuntimeError):
    """A problem the user can act on (unreachable server, refused request, unreadable file)."""


# --------------------------------------------------------------------------------------------------
# REST
# --------------------------------------------------------------------------------------------------
def parse_bbox(text: str) -> tuple[int, int, int, int]:
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"bbox must be x1,y1,x2,y2, got {text!r}")
    try:
        return tuple(parse_int(p) for p in parts)  # type: ignore[return-value]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"bbox must be four integers x1,y1,x2,y2, got {text!r}") from None


def build_request(images: Sequence[bytes], bboxes: Sequence | None = None, top_k: int = 5, azure: bool = False) -> dict:
    """The JSON body: base64 images (+ bbox columns) and the top_k parameter, as a pandas split frame under
    `dataframe_split` (mlflow models serve) or `input_data` with its index (Azure ML's scoring script)."""
    columns = ["image"]
    rows = [[base64.b64encode(data).decode("ascii")] for data in images]
    if bboxes is not None and any(b is not None for b in bboxes):
        columns += ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]
        for row, bbox in zip(rows, bboxes):
            row.extend(list(bbox) if bbox is not None else [None] * 4)
    params = {"top_k": int(top_k)}
    if azure:
        return {"input_data": {"columns": columns, "index": list(range(len(rows))), "data": rows}, "params": params}
    return {"dataframe_split": {"columns": columns, "data": rows}, "params": params}


def _server_message(response) -> str:
    try:
        body = response.json()
        return str(body.get("message", body))
    except ValueError:
        return response.text.strip()[:500]


def post_invocations(url: str, body: dict, timeout: float = 120.0) -> list[dict]:
    """POST one request; returns the list of predictions or raises ScoringError with the server's message."""
    import requests

    endpoint = url.rstrip("/")
    if not endpoint.endswith("/invocations"):
        endpoint += "/invocations"
    try:
        response = requests.post(
            endpoint, data=json.dumps(body), timeout=timeout, headers={"Content-Type": "application/json"}
        )
    except requests.exceptions.ConnectionError:
        raise ScoringError(f"cannot connect to {endpoint} (is `mlflow models serve` running there?)") from None
    except requests.exceptions.Timeout:
        raise ScoringError(f"{endpoint} did not answer within {timeout:.0f} s") from None
    if response.status_code != 200:
        raise ScoringError(f"the server refused the request (HTTP {response.status_code}): {_server_message(response)}")
    return response.json()["predictions"]


def post_azure(
    endpoint: str, body: dict, key: str, deployment: str | None = None, timeout: float = 120.0
) -> list[dict]:
    """POST one request to an Azure ML online endpoint's scoring URI; returns one dict per row."""
    import requests

    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    if deployment:
        headers["azureml-model-deployment"] = deployment
    target = f"{endpoint} (deployment {deployment})" if deployment else endpoint
    try:
        response = requests.post(endpoint, data=json.dumps(body), timeout=timeout, headers=headers)
    except requests.exceptions.ConnectionError:
        raise ScoringError(f"cannot connect to {target}: check --azure-endpoint (the endpoint's scoring URI)") from None
    except requests.exceptions.Timeout:
        raise ScoringError(f"{target} did not answer within {timeout:.0f} s") from None
    if response.status_code in (401, 403):
        raise ScoringError(
            f"{target} refused the key (HTTP {response.status_code}): check --key or "
            "AZUREML_ENDPOINT_KEY (az ml online-endpoint get-credentials -n <endpoint>)"
        )
    if response.status_code != 200:
        hint = ""
        if response.status_code >= 500:
            # Azure's scoring script answers any exception with a fixed text; the cause is in the log.
            hint = (
                " (the cause is in the deployment log: az ml online-deployment get-logs -e <endpoint> -n <deployment>)"
            )
        message = " ".join(_server_message(response).split())[:500]
        raise ScoringError(f"the endpoint refused the request (HTTP {response.status_code}): {message}{hint}")
    try:
        answer = response.json()
    except ValueError:
        raise ScoringError(
            f"{target} answered HTTP 200 with a body that is not JSON: {response.text[:200]!r}"
        ) from None
    if isinstance(answer, str):  # some inference servers JSON-encode the scoring script's JSON once more
        answer = json.loads(answer)
    if isinstance(answer, dict) and "predictions" in answer:
        answer = answer["predictions"]
    if not isinstance(answer, list) or not all(isinstance(row, dict) for row in answer):
        raise ScoringError(f"{target} answered with {type(answer).__name__}, not one record per photo")
    for row in answer:
        if isinstance(row.get("top_k"), str):  # a signature Azure can sample from may carry it as JSON text
            row["top_k"] = json.loads(row["top_k"])
    return answer


def score_files(
    url: str,
    paths: Sequence[os.PathLike | str],
    top_k: int = 5,
    bbox=None,
    batch_size: int = 16,
    timeout: float = 120.0,
    azure_key: str | None = None,
    deployment: str | None = None,
) -> list[dict]:
    """Score image files through the REST endpoint, ``batch_size`` per request; one dict per file.
    With ``azure_key``, ``url`` is an Azure ML online endpoint's scoring URI."""
    if batch_size < 1:
        raise ScoringError(f"--batch-size must be >= 1, got {batch_size}")
    paths = [pathlib.Path(p) for p in paths]
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = []
        for path in chunk:
            try:
                images.append(path.read_bytes())
            except OSError as exc:
                raise ScoringError(f"{path}: cannot read ({exc.strerror or exc})") from None
        body = build_request(images, [bbox] * len(chunk) if bbox else None, top_k, azure=azure_key is not None)
        try:
            if azure_key is not None:
                predictions = post_azure(url, body, azure_key, deployment, timeout=timeout)
            else:
                predictions = post_invocations(url, body, timeout=timeout)
        except ScoringError as exc:
            # The server names rows of this request: name the file instead.
            message = re.sub(
                r"\brow (\d+):",
                lambda m, chunk=chunk: f"{chunk[int(m.group(1))]}:" if int(m.group(1)) < len(chunk) else m.group(0),
                str(exc),
            )
            raise ScoringError(message) from None
        if len(predictions) != len(chunk):
            raise ScoringError(f"{url} answered {len(predictions)} predictions for {len(chunk)} photos")
        for path, prediction in zip(chunk, predictions):
            results.append(dict(file=str(path), **prediction))
    return results


def format_table(results: Sequence[dict]) -> str:
    width = max([len("file")] + [len(r["file"]) for r in results])
    label_width = max([len("label")] + [len(str(r.get("label"))) for r in results])
    lines = [f"{'file':<{width}}  {'label':<{label_width}}  {'prob':>6}  runners-up"]
    for r in results:
        if r.get("error"):  # errors=coerce: the photo's problem instead of a prediction
            lines.append(f"{r['file']:<{width}}  {'-':<{label_width}}  {'-':>6}  error: {r['error']}")
            continue
        runners = ", ".join(f"{e['label']} ({e['prob']:.3f})" for e in (r.get("top_k") or [])[1:])
        lines.append(f"{r['file']:<{width}}  {str(r['label']):<{label_width}}  {r['prob']:>6.3f}  {runners}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Spark
# --------------------------------------------------------------------------------------------------
def _local_spark():
    from pyspark.sql import SparkSession

    # Python workers must run this interpreter (pandas, MLflow, TensorFlow), not the first `python3` on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return (
        SparkSession.builder.master(os.environ.get("CARCLF_SPARK_MASTER", "local[*]"))
        .appName("carclf-score")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.pyspark.python", os.environ["PYSPARK_PYTHON"])
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .getOrCreate()
    )


def score_folder_spark(
    model_uri: str, input_dir: os.PathLike | str, output: os.PathLike | str, top_k: int = 5, spark=None
) -> int:
    """Score every image under ``input_dir`` with ``spark_udf``; writes Parquet (path, label, class_id, prob,
    top_k, error) to ``output`` (written under a temporary name, renamed when complete). Returns the row count."""
    import mlflow.pyfunc
    from pyspark.sql import functions as F

    input_dir = pathlib.Path(input_dir)
    output = pathlib.Path(output)
    if not input_dir.is_dir():
        raise ScoringError(f"--input-dir {input_dir} is not a folder")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in input_dir.rglob("*") if p.is_file()):
        raise ScoringError(f"--input-dir {input_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    spark = spark or _local_spark()
    files = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .load(str(input_dir))
        .where(F.lower(F.col("path")).rlike("(" + "|".join(re.escape(s) for s in IMAGE_SUFFIXES) + ")$"))
    )
    predict = mlflow.pyfunc.spark_udf(
        spark,
        model_uri,
        result_type=SPARK_RESULT_TYPE,
        env_manager="local",
        params={"top_k": int(top_k), "errors": "coerce"},
    )
    scored = files.select("path", predict(F.col("content")).alias("p"))
    # A bad image comes back with an empty top_k (a good one has at least one entry). spark_udf's struct
    # conversion turns its null label/error into the text "None" and its null class_id/prob into NaN, so
    # the fields are rebuilt from that flag instead of being trusted as they are.
    bad = F.size(F.col("p.top_k")) == 0
    result = scored.select(
        "path",
        F.when(bad, F.lit(None)).otherwise(F.col("p.label")).alias("label"),
        F.when(bad, F.lit(None)).otherwise(F.col("p.class_id").cast("long")).alias("class_id"),
        F.when(bad, F.lit(None)).otherwise(F.col("p.prob")).alias("prob"),
        F.when(bad, F.lit(None)).otherwise(F.col("p.top_k")).alias("top_k"),
        F.when(bad, F.col("p.error")).otherwise(F.lit(None)).alias("error"),
    )
    from carclf.files.atomic import partial_path, remove_stale_partials

    # A killed earlier run's folder goes first; this run's is named after its pid, so the next run can tell.
    remove_stale_partials(output.parent)
    partial = partial_path(output)
    result.write.mode("error").parquet(str(partial))
    count = spark.read.parquet(str(partial)).count()
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    os.replace(partial, output)
    return count


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScoreSparkConfig:
    """The `score` entry point's parameters: batch scoring of a folder on Spark (``--spark``).

    The REST client's flags (``--url``, ``--azure-endpoint``, ...) are CLI only. ``model_uri`` and
    ``input_dir`` are required by MLproject; on the CLI only with ``--spark`` (``main`` checks), since the
    REST mode does not take them. ``output`` has its default on the CLI as in MLproject.
    """

    model_uri: str = param(help="model to load in Spark (runs:/..., models:/..., a path)")
    input_dir: str = param(help="folder of images (searched recursively) for --spark", mlproject_type="path")
    output: str = param("scores.parquet", "Parquet output for --spark")
    top_k: int = param(5, "classes per image")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m entry_points.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="image files to score through --url")
    parser.add_argument("--url", default=None, help="base URL of `mlflow models serve` (http://127.0.0.1:5000)")
    parser.add_argument(
        "--azure-endpoint",
        default=None,
        help="scoring URI of an Azure ML managed online endpoint (https://...inference.ml.azure.com/score)",
    )
    parser.add_argument(
        "--key", default=None, help="endpoint key for --azure-endpoint (default: $AZUREML_ENDPOINT_KEY)"
    )
    parser.add_argument(
        "--deployment",
        default=None,
        help="--azure-endpoint: score this deployment alone (azureml-model-deployment header)",
    )
    parser.add_argument("--bbox", type=parse_bbox, default=None, help="x1,y1,x2,y2 crop applied to every file")
    parser.add_argument("--batch-size", type=parse_int, default=16, help="images per request")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one request")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--spark", action="store_true", help="batch-score --input-dir on local Spark")
    add_arguments(parser, ScoreSparkConfig, enforce_required=False)
    return parser


def _rest_target(args) -> tuple[str, str | None, str | None]:
    """(url, Azure key or None, deployment or None) from --url / --azure-endpoint / --key / --deployment."""
    import urllib.parse

    if args.azure_endpoint is None:
        for flag, value in (("--key", args.key), ("--deployment", args.deployment)):
            if value is not None:
                raise ScoringError(f"{flag} is for --azure-endpoint (an Azure ML online endpoint), not --url")
        return args.url or "http://127.0.0.1:5000", None, None
    if args.url is not None:
        raise ScoringError("give --url (mlflow models serve) or --azure-endpoint (Azure ML), not both")
    parsed = urllib.parse.urlparse(args.azure_endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ScoringError(
            f"--azure-endpoint {args.azure_endpoint!r} is not a URL: give the endpoint's scoring URI "
            "(az ml online-endpoint show -n <endpoint> --query scoring_uri -o tsv)"
        )
    key = args.key if args.key is not None else os.environ.get("AZUREML_ENDPOINT_KEY")
    if not key or not key.strip():
        raise ScoringError(
            "--azure-endpoint needs the endpoint key: pass --key or set AZUREML_ENDPOINT_KEY "
            "(az ml online-endpoint get-credentials -n <endpoint> --query primaryKey -o tsv)"
        )
    deployment = args.deployment.strip() if args.deployment is not None else None
    if deployment is not None and not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{1,31}", deployment):
        raise ScoringError(
            f"--deployment {args.deployment!r} is not an Azure deployment name "
            "(3-32 letters, digits or dashes, starting with a letter)"
        )
    return args.azure_endpoint, key.strip(), deployment


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.top_k < 1:
            raise ScoringError(f"--top-k must be >= 1, got {args.top_k}")
        if args.spark:
            missing = [
                flag
                for flag, value in (
                    ("--model-uri", args.model_uri),
                    ("--input-dir", args.input_dir),
                    ("--output", args.output),
                )
                if not value
            ]
            if missing:
                raise ScoringError(f"--spark needs {', '.join(missing)}")
            config = config_from_args(ScoreSparkConfig, args)
            count = score_folder_spark(config.model_uri, config.input_dir, config.output, top_k=config.top_k)
            print(f"scored {count} images -> {args.output}")
            return 0
        if not args.files:
            raise ScoringError("no image files given (or use --spark --input-dir)")
        url, key, deployment = _rest_target(args)
        results = score_files(
            url,
            args.files,
            top_k=args.top_k,
            bbox=args.bbox,
            batch_size=args.batch_size,
            timeout=args.timeout,
            azure_key=key,
            deployment=deployment,
        )
    except ScoringError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # A model URI that does not resolve, an unreadable model: MLflow says what; no traceback for that.
        from mlflow.exceptions import MlflowException

        if not isinstance(exc, MlflowException):
            raise
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
