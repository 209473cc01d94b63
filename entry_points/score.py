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
comes back with its ``error`` text (under Azure's server the model's ``errors=auto`` means ``coerce``, whoever
deployed it).

Azure ML batch endpoint (``deploy --kind batch``): start a job over a folder in Azure storage::

    python -m entry_points.score --azure-batch-endpoint https://<endpoint>.<region>.inference.ml.azure.com/jobs \
        --input azureml://datastores/<datastore>/paths/<folder>/ [--auth auto|service_principal|cli|managed_identity]

It prints the job's name and the `az ml job` commands that follow it and download its CSV (file, label,
class_id, prob, top_k, error: a bad file is a row with its error).

Spark (``mlflow.pyfunc.spark_udf``; a local Spark, a cluster, or Spark Connect with ``--spark-master sc://host:15002``)::

    python -m entry_points.score --spark --model-uri models:/carclf/1 --input-dir photos/ --output scores.parquet \
        [--spark-master local[*]]

Bad images do not stop a Spark job: they get a null prediction and an ``error`` text (``errors=coerce``).
With ``--public-key pub.pem`` (or $CARCLF_MODEL_PUBLIC_KEY) the model is downloaded once, checked against its
manifest and signature (``carclf.verification.model_check``), and that checked copy is what Spark loads; a
tampered or unsigned model is refused in one line before Spark starts.

This module is the step's CLI; the clients are ``carclf.scoring.rest_client`` and ``carclf.scoring.spark_batch``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence

from carclf.cli.cli_args import parse_int
from carclf.cli.step_config import OneLineErrorParser, add_arguments, config_from_args, param
from carclf.compute.spark_session import SparkSetupError
from carclf.files.atomic import OutputWriteError
from carclf.scoring.errors import ScoringError
from carclf.scoring.rest_client import score_files
from carclf.scoring.spark_batch import score_folder_spark
from carclf.verification.model_check import PUBLIC_KEY_ENV_VAR, ModelVerificationError, verified_model_uri

__all__ = ["ScoreSparkConfig", "build_parser", "format_table", "main", "parse_bbox"]


def parse_bbox(text: str) -> tuple[int, int, int, int]:
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"bbox must be x1,y1,x2,y2, got {text!r}")
    try:
        return tuple(parse_int(p) for p in parts)  # type: ignore[return-value]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"bbox must be four integers x1,y1,x2,y2, got {text!r}") from None


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
    spark_master: str = param(
        "local[*]",
        "Spark master URL for --spark (local[N], spark://host:7077, sc://host:15002 for Spark Connect); "
        "an active session (Databricks) is used as is",
    )
    public_key: str = param(
        "", f"--spark: refuse the model unless it is signed for this EC public key PEM (default: ${PUBLIC_KEY_ENV_VAR})"
    )


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
    parser.add_argument(
        "--azure-batch-endpoint",
        default=None,
        help="invocation URI of an Azure ML batch endpoint (https://...inference.ml.azure.com/jobs): start a job",
    )
    parser.add_argument(
        "--input", default=None, help="--azure-batch-endpoint: the photos' folder (azureml://datastores/.../paths/...)"
    )
    parser.add_argument(
        "--auth",
        default="auto",
        choices=("auto", "service_principal", "cli", "managed_identity"),
        help="--azure-batch-endpoint: how to sign in to Azure",
    )
    parser.add_argument("--bbox", type=parse_bbox, default=None, help="x1,y1,x2,y2 crop applied to every file")
    parser.add_argument("--batch-size", type=parse_int, default=16, help="images per request")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one request")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--spark", action="store_true", help="batch-score --input-dir on Spark (--spark-master)")
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
        if args.azure_batch_endpoint is not None or args.input is not None:
            if args.azure_batch_endpoint is None:
                raise ScoringError("--input is for --azure-batch-endpoint (an Azure ML batch endpoint)")
            others = [f for f, v in (("--url", args.url), ("--azure-endpoint", args.azure_endpoint)) if v] + (
                ["--spark"] if args.spark else []
            )
            if others or args.files:
                raise ScoringError(
                    "--azure-batch-endpoint scores the --input folder in Azure: give no "
                    + (", ".join(others) if others else "local files")
                )
            if not args.input:
                raise ScoringError(
                    "--azure-batch-endpoint needs --input azureml://datastores/<datastore>/paths/<folder>/"
                )
            import logging

            from carclf.scoring.azure_batch_job import start_batch_job

            # azure-identity logs its failed token request as a multi-line WARNING; the error line says it all.
            logging.getLogger("azure.identity").setLevel(logging.ERROR)

            print(json.dumps(start_batch_job(args.azure_batch_endpoint, args.input, args.auth, args.timeout), indent=2))
            return 0
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
            with verified_model_uri(config.model_uri, config.public_key) as model_uri:
                count = score_folder_spark(
                    model_uri,
                    config.input_dir,
                    config.output,
                    top_k=config.top_k,
                    spark_master=config.spark_master,
                )
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
    except (ScoringError, SparkSetupError, ModelVerificationError, OutputWriteError) as exc:
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
