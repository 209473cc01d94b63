"""carclf MLflow flavor (placeholder until the flavor lands)."""
from carclf_flavor.version import __version__  # noqa: F401
