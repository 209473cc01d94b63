"""`demo`: a local web page where people drop car photos and see the model's top 5 and where it looked.

    mlflow run . -e demo -P model_uri=models:/carclf/1 [-P port=8080] [-P host=127.0.0.1]
    python -m entry_points.demo --model-uri models:/carclf/1 [--port 8080] [--host 127.0.0.1]

Loads the model through the flavor (``carclf_flavor.load_model``) and serves ``carclf.demo.app`` with
uvicorn on loopback by default; open the printed address in a browser. Ctrl+C stops it. With
``-P public_key=pub.pem`` (or $CARCLF_MODEL_PUBLIC_KEY) the model is checked against its manifest and signature
first and a tampered or unsigned one is refused in one line (``carclf.verification.model_check``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import signal
import sys

from carclf.cli.step_config import build_parser as build_parser_for
from carclf.cli.step_config import param, resolve_config, run_step
from carclf.compute.ports import AddressInUse, check_address_free
from carclf.compute.process_lifetime import end_with_parent
from carclf.demo.app import DEFAULT_MAX_FILES, DEFAULT_MAX_UPLOAD_BYTES
from carclf.verification.model_check import PUBLIC_KEY_ENV_VAR, ModelVerificationError, verified_model_uri

log = logging.getLogger(__name__)


class DemoError(ValueError):
    """A parameter or address the demo cannot use; the message names it."""


def _check_address_free(host: str, port: int) -> None:
    """Fail with one line before loading the model (slow) when the address cannot be bound."""
    try:
        check_address_free(host, port)
    except AddressInUse as exc:
        hint = ": pass another port (-P port=...)" if "already in use" in str(exc) else ""
        raise DemoError(f"{exc}{hint}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The `demo` step's parameters (carclf.cli.step_config: each default written once, here)."""

    model_uri: str = param(help="models:/carclf/1, runs:/<run>/model, a path, ...")
    host: str = param("127.0.0.1", "address to listen on (default: loopback only)")
    port: int = param(8080, "port to listen on")
    max_upload_mb: float = param(DEFAULT_MAX_UPLOAD_BYTES / (1024 * 1024), "largest photo accepted, in MiB")
    max_files: int = param(DEFAULT_MAX_FILES, "photos per drop")
    public_key: str = param(
        "", f"refuse the model unless it is signed for this EC public key PEM (default: ${PUBLIC_KEY_ENV_VAR})"
    )


def demo(config: DemoConfig | None = None, **overrides) -> None:
    """Serve the demo page for ``model_uri`` on ``host:port`` until interrupted."""
    import uvicorn

    import carclf_flavor
    from carclf.demo.app import create_app, describe_model

    c = resolve_config(DemoConfig, config, **overrides)
    model_uri, host, port, max_upload_mb, max_files = c.model_uri, c.host, c.port, c.max_upload_mb, c.max_files
    if not model_uri:
        raise DemoError("model_uri is empty: pass e.g. -P model_uri=models:/carclf/1")
    if not 0 < int(port) < 65536:
        raise DemoError(f"port must be in 1..65535, got {port}")
    if not float(max_upload_mb) > 0:
        raise DemoError(f"max_upload_mb must be > 0, got {max_upload_mb}")
    if int(max_files) < 1:
        raise DemoError(f"max_files must be >= 1, got {max_files}")
    _check_address_free(host, int(port))
    if not _is_loopback(host):
        log.warning("serving on %s: the page is reachable from other machines (it has no authentication)", host)
    # `mlflow run` terminated (or killed) must not leave the page serving: the server stops with its parent.
    end_with_parent(signal.SIGTERM)
    log.info("loading %s", model_uri)
    with verified_model_uri(model_uri, c.public_key) as checked_uri:
        classifier = carclf_flavor.load_model(checked_uri)
    card = describe_model(model_uri)
    app = create_app(
        classifier, card, max_upload_bytes=int(float(max_upload_mb) * 1024 * 1024), max_files=int(max_files)
    )
    shown_host = f"[{host}]" if ":" in host else host
    print(
        f"carclf demo of {card.name} version {card.version} ({classifier.precision}) on "
        f"http://{shown_host}:{int(port)}/  (Ctrl+C stops it)",
        flush=True,
    )
    uvicorn.run(app, host=host, port=int(port), log_level="info", timeout_graceful_shutdown=5)


def build_parser():
    return build_parser_for(DemoConfig, "python -m entry_points.demo", __doc__.splitlines()[0])


def _error_line(exc: BaseException, config: DemoConfig) -> str | None:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (DemoError, ModelVerificationError)):
        return str(exc)
    if isinstance(exc, MlflowException):
        return f"{config.model_uri}: {str(exc.message).splitlines()[0]}"
    return None


def main(argv=None) -> int:
    return run_step(
        demo,
        DemoConfig,
        "python -m entry_points.demo",
        __doc__.splitlines()[0],
        argv,
        error_line=_error_line,
        print_result=lambda result, config: None,
    )


if __name__ == "__main__":
    sys.exit(main())
