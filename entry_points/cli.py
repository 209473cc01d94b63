"""`carclf`: the package's console command (pyproject [project.scripts]).

    carclf verify MODEL_URI [--public-key pub.pem]

``verify`` downloads the model, checks every file against its manifest (carclf-manifest.json) and, with a
public key (or $CARCLF_MODEL_PUBLIC_KEY), its OpenSSF model-signing signature. Exit 0 and one line
"verified ..." when it holds, exit 1 and one line naming the problem when not, 2 for a usage error.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence

from carclf.cli.step_config import OneLineErrorParser
from carclf.verification.model_check import (
    PUBLIC_KEY_ENV_VAR,
    ModelVerificationError,
    download_verified,
    public_key_from,
)


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="carclf", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    verify = commands.add_parser("verify", help="check a model's files against its manifest and signature")
    verify.add_argument("model_uri", help="runs:/<run>/model, models:/carclf/1, a path, ...")
    verify.add_argument(
        "--public-key",
        default=None,
        help=f"elliptic-curve public key PEM the model was signed for (default: ${PUBLIC_KEY_ENV_VAR})",
    )
    return parser


def verify(model_uri: str, public_key=None) -> str:
    """The "verified ..." line for ``model_uri``; ``ModelVerificationError`` (one line) when it does not hold."""
    key = public_key_from(public_key)
    with tempfile.TemporaryDirectory(prefix="carclf-verify-") as folder:
        return download_verified(model_uri, folder, key).summary(model_uri)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mlflow.exceptions import MlflowException

    try:
        print(verify(args.model_uri, args.public_key))
    except ModelVerificationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except MlflowException as exc:  # a URI that does not resolve
        print(f"error: {args.model_uri}: {str(exc.message).splitlines()[0]}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {args.model_uri}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
