"""`demo`: a local web page where people drop car photos and see the model's top 5 and where it looked.

    mlflow run . -e demo -P model_uri=models:/carclf/1 [-P port=8080] [-P host=127.0.0.1]
    python -m entry_points.demo --model-uri models:/carclf/1 [--port 8080] [--host 127.0.0.1]

Loads the model through the flavor (``carclf_flavor.load_model``) and serves ``entry_points.demo_app`` with
uvicorn on loopback by default; open the printed address in a browser. Ctrl+C stops it.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import socket
import sys

from entry_points.cli_args import parse_int
from entry_points.demo_app import DEFAULT_MAX_FILES, DEFAULT_MAX_UPLOAD_BYTES

log = logging.getLogger("carclf.demo")


class DemoError(ValueError):
    """A parameter or address the demo cannot use; the message names it."""


def _check_address_free(host: str, port: int) -> None:
    """Fail with one line before loading the model (slow) when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise DemoError(f"port {port} on {host} is already in use: pass another port (-P port=...)") from None
            raise DemoError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def demo(
    model_uri: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_BYTES / (1024 * 1024),
    max_files: int = DEFAULT_MAX_FILES,
) -> None:
    """Serve the demo page for ``model_uri`` on ``host:port`` until interrupted."""
    import uvicorn

    import carclf_flavor
    from entry_points.demo_app import create_app, describe_model

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
    log.info("loading %s", model_uri)
    classifier = carclf_flavor.load_model(model_uri)
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


def _parse_float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m entry_points.demo", description=__doc__.splitlines()[0])
    p.add_argument("--model-uri", required=True, help="models:/carclf/1, runs:/<run>/model, a path, ...")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=parse_int, default=8080)
    p.add_argument(
        "--max-upload-mb",
        type=_parse_float,
        default=DEFAULT_MAX_UPLOAD_BYTES / (1024 * 1024),
        help="largest photo accepted, in MiB",
    )
    p.add_argument("--max-files", type=parse_int, default=DEFAULT_MAX_FILES, help="photos per drop")
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    from mlflow.exceptions import MlflowException

    try:
        demo(args.model_uri, args.host, args.port, args.max_upload_mb, args.max_files)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MlflowException as exc:
        print(f"error: {args.model_uri}: {str(exc.message).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
