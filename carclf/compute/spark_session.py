"""Get a SparkSession for a step: the active one (Databricks, notebooks, tests) or a new, light one.

``get_spark(master)``:
- a remote master (``spark://``, ``k8s://``, ``sc://``) is probed first with a bounded TCP connect, so an
  unreachable master is one clear error within seconds instead of a job that waits forever for executors;
- a session this process already has is reused: a classic one whatever a classic ``master`` says (on
  Databricks the notebook's session is the cluster; a second SparkContext cannot exist in one process), a
  Spark Connect one when ``master`` is its ``sc://`` endpoint or the steps' default ``local[*]`` (a Databricks
  serverless notebook's session). PySpark cannot hold a classic and a Connect session in one process (the
  Connect client switches every DataFrame function of the process to Connect), so asking for the other kind
  is one line saying so, not a session of the wrong kind;
- ``sc://host:port`` (Spark Connect: Databricks serverless, standard access mode, Databricks Connect) needs
  the Connect client packages (grpcio, grpcio-status, googleapis-common-protos, zstandard; the core install
  has them): a missing one is one line saying what to pip install. Connect has no SparkContext: the code that
  needs one (``_wait_for_executors``, classic progress) is skipped there, and ``ship_project_code`` sends the
  project with ``addArtifacts(..., pyfile=True)``;
- otherwise Java is checked (missing or too old -> one line that says how to install it) and a session is
  built. Local sessions stay light and on loopback: no UI, few shuffle partitions, driver and block
  manager bound to 127.0.0.1 so nothing listens on or leaves through a public interface.
- the JVM's own output (log4j lines, Java stack traces) goes to a log file, ``spark_log_path()``:
  ``$CARCLF_SPARK_LOG_DIR`` (default ``<temp dir>/carclf-logs``) ``/spark-<pid>.log``; a failed start is one
  line naming the master, the reason Java gave, and that file.

No pyspark import happens at module import: steps that fail validation never start a JVM.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

DEFAULT_MASTER = "local[*]"  # the steps' default: the session this process has, else a local one
MIN_JAVA = 17  # Spark 4 runs on Java 17+
JAVA_INSTALL_HINT = (
    "install it with `apt-get install -y default-jre-headless` (Debian/Ubuntu) or set JAVA_HOME to a "
    f"Java {MIN_JAVA}+ installation"
)
PROBE_TIMEOUT_S = 5.0
EXECUTOR_WAIT_S = 60.0


SPARK_LOG_DIR_ENV = "CARCLF_SPARK_LOG_DIR"
# What the Spark Connect client imports beyond pyspark's core (module, distribution): pyspark[connect]'s
# requirements, which carclf's core dependencies name (pyproject.toml).
CONNECT_CLIENT_PACKAGES = (
    ("grpc", "grpcio"),
    ("grpc_status", "grpcio-status"),
    ("google.rpc", "googleapis-common-protos"),
    ("zstandard", "zstandard"),
)
# Spark 4's master URL schemes (SparkSubmit refuses anything else, after a JVM start of ~10 s).
MASTER_SCHEMES = ("local", "yarn", "spark://", "k8s://", "sc://")
# "org.apache.spark.SparkException: Could not parse Master URL: 'local[abc]'", optionally after
# 'Exception in thread "main" '.
_JAVA_EXCEPTION_LINE = re.compile(
    r'^(?:Exception in thread "[^"]*" )?(?:Caused by: )?'
    r"((?:[a-z_$][\w$]*\.)+[A-Z][\w$]*(?:Exception|Error))(?:: (.*))?$"
)


class SparkSetupError(RuntimeError):
    """Spark cannot start or reach its master; the message says what to do."""


def spark_log_path() -> pathlib.Path:
    """The file the JVM of this process writes its own output to."""
    folder = pathlib.Path(os.environ.get(SPARK_LOG_DIR_ENV) or pathlib.Path(tempfile.gettempdir()) / "carclf-logs")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"spark-{os.getpid()}.log"


@contextlib.contextmanager
def _stderr_to(path: pathlib.Path):
    """Point file descriptor 2 at ``path`` while the JVM is launched: the JVM inherits it and keeps writing
    there (Java's stack traces included); Python's stderr is restored afterwards."""
    sys.stderr.flush()
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(2)
    try:
        os.dup2(target, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(target)


def _java_reason(exc: BaseException, log_text: str) -> str:
    """The reason Java gave: the JVM exception's message (Py4J) or the first Java exception in its log."""
    java = getattr(exc, "java_exception", None)
    candidates = []
    if java is not None:
        try:
            candidates.append(str(java.toString()))
        except Exception:
            pass
    candidates.extend(log_text.splitlines())
    for line in candidates:
        match = _JAVA_EXCEPTION_LINE.match(line.strip())
        if match:
            return match.group(2) or match.group(1).rsplit(".", 1)[-1]
    return _first_line(exc)


def is_local_master(master: str) -> bool:
    return master == "local" or master.startswith("local[")


def find_java(env: Mapping[str, str] | None = None) -> str | None:
    """The java binary Spark's launcher would use: $JAVA_HOME/bin/java, else java on PATH."""
    env = os.environ if env is None else env
    java_home = env.get("JAVA_HOME")
    if java_home:
        candidate = pathlib.Path(java_home) / "bin" / "java"
        return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None
    return shutil.which("java", path=env.get("PATH", ""))


def java_major_version(java: str) -> int | None:
    """Major version from ``java -version`` ("17.0.15" -> 17, "1.8.0_392" -> 8); None if unparsable."""
    try:
        result = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def check_java(env: Mapping[str, str] | None = None) -> str:
    """Path of a usable java, or SparkSetupError naming the problem and how to fix it."""
    env = os.environ if env is None else env
    java = find_java(env)
    if java is None:
        where = f"JAVA_HOME={env['JAVA_HOME']} has no bin/java" if env.get("JAVA_HOME") else "no java on PATH"
        raise SparkSetupError(f"Spark needs Java {MIN_JAVA}+ but {where}; {JAVA_INSTALL_HINT}")
    major = java_major_version(java)
    if major is None:
        raise SparkSetupError(f"Spark needs Java {MIN_JAVA}+ but `{java} -version` did not run; {JAVA_INSTALL_HINT}")
    if major < MIN_JAVA:
        raise SparkSetupError(f"Spark needs Java {MIN_JAVA}+ but {java} is Java {major}; {JAVA_INSTALL_HINT}")
    return java


def master_endpoints(master: str) -> list[tuple[str, int]]:
    """(host, port) pairs a remote master URL points at; empty for local/yarn (nothing to probe)."""
    if master.startswith("spark://"):
        # Standalone HA masters: spark://host1:7077,host2:7077
        hosts = master[len("spark://") :].split(",")
        out = []
        for item in hosts:
            host, _, port = item.strip().rpartition(":")
            if not host:
                host, port = port, "7077"
            out.append((host, int(port)))
        return out
    if master.startswith("k8s://"):
        url = urlsplit(master[len("k8s://") :] if "://" in master[len("k8s://") :] else "https://" + master[6:])
        return [(url.hostname or "", url.port or (443 if url.scheme == "https" else 80))]
    if master.startswith("sc://"):
        url = urlsplit(master.replace("sc://", "http://", 1))
        return [(url.hostname or "localhost", url.port or 15002)]
    return []


def check_master_reachable(master: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """A TCP connect to (one of) the master's endpoints within ``timeout_s``, else SparkSetupError."""
    try:
        endpoints = master_endpoints(master)
    except ValueError:
        raise SparkSetupError(f"Spark master URL {master!r} is malformed (expected e.g. spark://host:7077)") from None
    problems = []
    for host, port in endpoints:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return
        except OSError as exc:
            problems.append(f"{host}:{port} ({exc.strerror or type(exc).__name__})")
    if problems:
        raise SparkSetupError(
            f"cannot reach Spark master {master} ({', '.join(problems)}; waited at most {timeout_s:g} s); "
            "check the URL and that the master is running"
        )


def _classic_session():
    """The classic SparkSession of this process (its SparkContext running), else None."""
    from pyspark import SparkContext
    from pyspark.sql.session import SparkSession

    if SparkContext._active_spark_context is None:
        return None
    # _instantiatedSession: a session made in another thread of this process is not "active" here but is ours.
    return SparkSession._instantiatedSession or SparkSession._activeSession


def _connect_session():
    """The Spark Connect session of this process (active in this thread, else the default one), else None."""
    module = sys.modules.get("pyspark.sql.connect.session")  # never imported: no Connect session exists
    if module is None:
        return None
    remote = module.SparkSession
    return remote.getActiveSession() or remote._get_default_session()


def active_session():
    """The session ``get_spark`` would reuse for the steps' default master: classic or Connect, else None."""
    return _classic_session() or _connect_session()


def is_connect_session(spark) -> bool:
    """A Spark Connect session (pyspark's or Databricks Connect's): no SparkContext, no RDDs, no JVM here."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def connect_endpoint(master_or_session) -> str:
    """``sc://host:port`` of a Connect URL or session; the URL's parameters (a token, ...) are left out."""
    if isinstance(master_or_session, str):
        ((host, port),) = master_endpoints(master_or_session)
        return f"sc://{host}:{port}"
    builder = getattr(getattr(master_or_session, "client", None), "_builder", None)
    endpoint = getattr(builder, "endpoint", None)
    return f"sc://{endpoint}" if endpoint else "sc://"


def session_master(spark) -> str:
    """The master a step records: the classic session's master, or a Connect session's ``sc://host:port``
    (what the user gave, not the master the Connect server runs on)."""
    if is_connect_session(spark):
        return connect_endpoint(spark)
    try:
        return spark.sparkContext.master
    except Exception:  # a managed runtime that hides the SparkContext
        return spark.conf.get("spark.master", "unknown")


def server_conf(spark, key: str, default: str | None = None) -> str | None:
    """A setting of the Spark application (``spark.master``, ``spark.executor.cores``, ...) through
    ``spark.conf``, which classic and Connect sessions both have; ``default`` where it is unset or hidden."""
    try:
        value = spark.conf.get(key, default)
    except Exception:  # a managed runtime may refuse to read some settings
        return default
    return default if value is None else str(value)


def local_slots(master: str) -> int | None:
    """Task slots of a ``local[N]`` / ``local[N,F]`` / ``local[*]`` / ``local`` master; None for a cluster."""
    if master == "local":
        return 1
    if master.startswith("local[") and master.endswith("]"):
        inner = master[len("local[") : -1].split(",")[0].strip()
        return os.cpu_count() or 1 if inner == "*" else max(1, int(inner))
    return None


def task_slots(spark) -> int | None:
    """Tasks the application runs at once: ``defaultParallelism`` on a classic session; on Connect the
    server's ``spark.default.parallelism`` or its local master's threads; None if it cannot tell."""
    if not is_connect_session(spark):
        try:
            return int(spark.sparkContext.defaultParallelism)
        except Exception:
            return None
    configured = server_conf(spark, "spark.default.parallelism")
    if configured:
        return int(configured)
    return local_slots(server_conf(spark, "spark.master", "") or "")


def local_conf(master: str) -> dict:
    """Settings that keep a local session light and on loopback."""
    return {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": "4",
        "spark.driver.memory": os.environ.get("CARCLF_SPARK_DRIVER_MEMORY", "1g"),
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.python.worker.reuse": "true",
    }


def check_connect_client(master: str) -> None:
    """The Spark Connect client's packages import, else SparkSetupError with the pip command (one line)."""
    import pyspark

    missing = []
    for module, distribution in CONNECT_CLIENT_PACKAGES:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(distribution)
    if missing:
        raise SparkSetupError(
            f"Spark Connect ({master}) needs {', '.join(missing)}, not installed here: "
            f"pip install 'pyspark[connect]=={pyspark.__version__}' (carclf's own install includes them)"
        )


def _reusable_session(master: str):
    """The session of this process that serves ``master``, None if a new one must be built; SparkSetupError
    where PySpark cannot build one beside what this process holds."""
    classic, remote = _classic_session(), _connect_session()
    if master.startswith("sc://"):
        if remote is not None and connect_endpoint(remote) == connect_endpoint(master):
            return remote
        if classic is not None:
            raise SparkSetupError(
                f"cannot open Spark Connect on {master}: this process already runs a classic Spark session "
                f"({session_master(classic)}) and PySpark cannot hold both; run the step in a process of its own"
            )
        return None
    if classic is not None:
        current = session_master(classic)
        if current != master:
            log.info("using the active Spark session (master %s) instead of starting one on %s", current, master)
        return classic
    if remote is not None:
        if master == DEFAULT_MASTER:
            log.info("using this process's Spark Connect session (%s)", connect_endpoint(remote))
            return remote
        raise SparkSetupError(
            f"cannot start Spark on {master}: this process holds a Spark Connect session "
            f"({connect_endpoint(remote)}) and PySpark cannot hold a classic one beside it; pass "
            f"spark_master={connect_endpoint(remote)} or run the step in a process of its own"
        )
    return None


def get_spark(
    master: str = DEFAULT_MASTER,
    app_name: str = "carclf",
    conf: Mapping[str, str] | None = None,
    executor_wait_s: float = EXECUTOR_WAIT_S,
):
    """The session of this process for ``master``, or a new one; errors are SparkSetupError with one clear line."""
    master = (master or DEFAULT_MASTER).strip()
    check_master_reachable(master)
    os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")  # pyspark.pandas warns on import otherwise
    try:
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise SparkSetupError(f"pyspark is not installed ({exc}); pip install 'pyspark>=4,<4.4'") from None
    connect = master.startswith("sc://")
    if connect:
        check_connect_client(master)

    reused = _reusable_session(master)
    if reused is not None:
        return reused

    if not master.startswith(MASTER_SCHEMES):
        raise SparkSetupError(
            f"Spark master URL {master!r} is not one Spark accepts (expected local[N], yarn, spark://host:7077, "
            "k8s://https://host:port or sc://host:15002)"
        )
    if connect:
        return _connect(master, app_name, conf)
    check_java()
    builder = SparkSession.builder.master(master)
    builder = builder.appName(app_name).config("spark.task.maxFailures", "4")
    if is_local_master(master):
        # Workers are started by the JVM: make them run this interpreter (the venv), not whatever
        # `python3` is first on PATH, and keep every socket on loopback.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        for key, value in local_conf(master).items():
            builder = builder.config(key, value)
    for key, value in (conf or {}).items():
        builder = builder.config(key, str(value))
    log_path = spark_log_path()
    start = log_path.stat().st_size if log_path.exists() else 0
    try:
        with _stderr_to(log_path):
            spark = builder.getOrCreate()
    except Exception as exc:
        with open(log_path, "rb") as handle:
            handle.seek(start)
            text = handle.read().decode("utf-8", "replace")
        raise SparkSetupError(
            f"could not start Spark on {master}: {_java_reason(exc, text)} (Java's output: {log_path})"
        ) from None
    log.info("Spark on %s started; its own log: %s", master, log_path)
    if not is_local_master(master):
        _wait_for_executors(spark, master, executor_wait_s)
        ship_project_code(spark)
    return spark


def _connect(master: str, app_name: str, conf: Mapping[str, str] | None):
    """A Spark Connect session on ``master`` (no JVM here: the server runs Spark), the project shipped to it.
    The server's own settings (task retries, ...) are its operator's: only ``conf`` is passed on."""
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.remote(master).appName(app_name)
    for key, value in (conf or {}).items():
        builder = builder.config(key, str(value))
    try:
        # Another Connect session (another endpoint) may exist: getOrCreate would hand that one back.
        spark = builder.create() if _connect_session() is not None else builder.getOrCreate()
        version = spark.version  # the first call to the server: fails here if it is not one
        ship_project_code(spark)
    except SparkSetupError:
        raise
    except Exception as exc:
        raise SparkSetupError(f"could not open a Spark Connect session on {master}: {_first_line(exc)}") from None
    log.info(
        "Spark Connect session on %s (Spark %s on %s)",
        connect_endpoint(master),
        version,
        server_conf(spark, "spark.master", "a master it does not show"),
    )
    return spark


def _wait_for_executors(spark, master: str, wait_s: float) -> None:
    """A cluster master that accepts the app but has no workers would make every job wait forever."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            # The driver itself is listed too: more than one entry means an executor registered.
            if spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() > 1:
                return
        except Exception:
            return  # cannot tell (e.g. a managed runtime): let the job run
        if time.monotonic() > deadline:
            spark.stop()
            raise SparkSetupError(
                f"no Spark executor registered with {master} within {wait_s:g} s; "
                "check that workers are running and have free cores"
            )
        time.sleep(1.0)


PROJECT_PACKAGES = ("carclf", "carclf_flavor", "entry_points")


def project_code_archive() -> pathlib.Path:
    """A zip of carclf, carclf_flavor and entry_points (their .py files) in a new temporary folder."""
    root = pathlib.Path(__file__).resolve().parents[2]  # the checkout: carclf/compute/spark_session.py
    archive = pathlib.Path(tempfile.mkdtemp(prefix="carclf-code-")) / "carclf_code.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for package in PROJECT_PACKAGES:
            for source in (root / package).rglob("*.py"):
                zf.write(source, source.relative_to(root).as_posix())
    return archive


def ship_project_code(spark) -> None:
    """Send carclf, carclf_flavor and entry_points to the executors (a cluster or a Connect server does not
    have this checkout): the tasks' functions live there (e.g. carclf.augmentation.range_task). Classic:
    ``SparkContext.addPyFile``; Spark Connect: ``addArtifacts(pyfile=True)``, this session's Python workers
    only."""
    archive = project_code_archive()
    if not is_connect_session(spark):
        spark.sparkContext.addPyFile(str(archive))  # the driver serves it from this file while the app runs
        return
    try:
        spark.addArtifacts(str(archive), pyfile=True)  # uploaded before it returns
    finally:
        shutil.rmtree(archive.parent, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
