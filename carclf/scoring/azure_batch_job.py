"""Start a job on an Azure ML batch endpoint (``deploy kind=batch``) over a folder of photos in Azure storage.

One POST to the endpoint's invocation URI (``https://<endpoint>.<region>.inference.ml.azure.com/jobs``) with an
Entra ID token for Azure ML (batch endpoints take no keys) and a ``uri_folder`` input, the REST form of
``az ml batch-endpoint invoke``. The credential source is decided up front, as in ``deploy``
(``carclf.deployment.azure_preflight``), so a missing login is one line at once, not a device-code prompt.
"""

from __future__ import annotations

import urllib.parse

from carclf.scoring.errors import ScoringError

# Batch endpoints accept tokens for the Azure ML data plane (az account get-access-token --resource https://ml.azure.com).
TOKEN_SCOPE = "https://ml.azure.com/.default"
INPUT_NAME = "photos"


def check_job_args(url: str, input_uri: str) -> None:
    parsed = urllib.parse.urlparse(url or "")
    if parsed.scheme != "https" or not parsed.hostname or not parsed.path.rstrip("/").endswith("/jobs"):
        raise ScoringError(
            f"--azure-batch-endpoint {url!r} is not a batch endpoint's invocation URI: give "
            "https://<endpoint>.<region>.inference.ml.azure.com/jobs "
            "(az ml batch-endpoint show -n <endpoint> --query scoring_uri -o tsv)"
        )
    if not (input_uri or "").startswith(("azureml://", "https://")):
        raise ScoringError(
            f"--input {input_uri!r}: give the folder of photos in Azure storage, "
            "azureml://datastores/<datastore>/paths/<folder>/ (or an https:// blob folder URL)"
        )


def start_batch_job(url: str, input_uri: str, auth: str = "auto", timeout: float = 60.0) -> dict:
    """Start a job scoring every file under `input_uri`; returns its name and where its output will be."""
    check_job_args(url, input_uri)
    from carclf.deployment.azure_preflight import PreflightError, find_credential
    from carclf.deployment.plugin_calls import azure_error_in_chain, env_defaults, narrowed_credential_env, one_line

    try:
        credential_source = find_credential(auth)
    except PreflightError as exc:
        raise ScoringError(str(exc)) from None
    from azure.core import PipelineClient
    from azure.core.pipeline.policies import BearerTokenCredentialPolicy, RetryPolicy
    from azure.core.pipeline.transport import RequestsTransport
    from azure.core.rest import HttpRequest
    from azure.identity import DefaultAzureCredential

    body = {"properties": {"InputData": {INPUT_NAME: {"JobInputType": "UriFolder", "Uri": input_uri}}}}
    with env_defaults(narrowed_credential_env(credential_source.token_credentials)):
        credential = DefaultAzureCredential()
        client = PipelineClient(
            base_url=url,
            policies=[RetryPolicy(retry_total=2), BearerTokenCredentialPolicy(credential, TOKEN_SCOPE)],
            transport=RequestsTransport(connection_timeout=min(timeout, 10.0), read_timeout=timeout),
        )
        try:
            response = client.send_request(HttpRequest("POST", url, json=body))
        except Exception as exc:
            azure = azure_error_in_chain(exc)
            if azure is None:
                raise
            text = one_line(getattr(azure, "message", None) or azure)
            raise ScoringError(f"starting a batch job on {url}: {type(azure).__name__}: {text}") from None
    if response.status_code >= 400:
        raise ScoringError(
            f"starting a batch job on {url}: HTTP {response.status_code}: {one_line(response.text())[:300]}"
        )
    job = response.json()
    name = job.get("name") or str(job.get("id", "")).rsplit("/", 1)[-1]
    return {
        "job": name,
        "id": job.get("id"),
        "status": (job.get("properties") or {}).get("status"),
        "input": input_uri,
        "follow": f"az ml job show -n {name} --web",
        "output": f"az ml job download -n {name} --output-name score --download-path .",
    }
