"""Which process owns a step's MLflow run, and ending the runs whose owner died.

A process killed outright (SIGKILL, out of memory, a lost container) cannot end its run, so MLflow shows it
RUNNING for ever. Each step therefore tags its run with the step name and its owner (host name, pid and the
process's start time: pids are reused, a pid alone could name an unrelated live process), and when a step
claims a run it ends, as KILLED, the RUNNING runs of the same step in the same experiment whose owner on this
host is gone. Runs owned on other hosts are left alone: their processes cannot be checked from here.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

TAG_STEP = "carclf.step"
TAG_OWNER_HOST = "carclf.owner.host"
TAG_OWNER_PID = "carclf.owner.pid"
TAG_OWNER_STARTED = "carclf.owner.process_start"


def process_start(pid: int) -> str | None:
    """An identity of process ``pid``'s start (boot id and start tick); None when no such process exists.

    On a system without /proc it is "" for a process that exists: the pid alone is checked there.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return _pid_exists(pid)
    # The command name (field 2) is in parentheses and may hold spaces: fields count from the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    start_ticks = fields[19].decode()  # field 22 of proc_pid_stat(5): start time after boot, in clock ticks
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{boot}:{start_ticks}"


def _pid_exists(pid: int) -> str | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it exists, owned by another user
    return ""


def owner_tags(step: str) -> dict[str, str]:
    """The tags that name ``step`` and this process as the owner of a run."""
    pid = os.getpid()
    return {
        TAG_STEP: step,
        TAG_OWNER_HOST: socket.gethostname(),
        TAG_OWNER_PID: str(pid),
        TAG_OWNER_STARTED: process_start(pid) or "",
    }


def owner_is_gone(tags: dict[str, str], host: str) -> bool:
    """True when the run's owner ran on ``host`` and that process no longer runs (or its pid was reused)."""
    if tags.get(TAG_OWNER_HOST) != host:
        return False
    try:
        pid = int(tags[TAG_OWNER_PID])
    except (KeyError, ValueError):
        return False
    now = process_start(pid)
    if now is None:
        return True
    recorded = tags.get(TAG_OWNER_STARTED, "")
    return bool(recorded and now and recorded != now)


def end_runs_of_dead_owners(client, experiment_id: str, step: str, *, keep: str | None = None) -> list[str]:
    """Set KILLED the RUNNING runs of ``step`` in ``experiment_id`` whose owner on this host is gone.

    ``keep``: a run id never touched (the caller's own run). Logs one line per run; returns their ids.
    """
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_STEP}` = '{step}' and tags.`{TAG_OWNER_HOST}` = '{host}' "
        "and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    ended = []
    for run in runs:
        if run.info.run_id == keep or not owner_is_gone(run.data.tags, host):
            continue
        client.set_terminated(run.info.run_id, "KILLED")
        log.warning(
            "step %s: run %s marked KILLED (its process %s on %s is gone)",
            step,
            run.info.run_id,
            run.data.tags.get(TAG_OWNER_PID),
            host,
        )
        ended.append(run.info.run_id)
    return ended


def claim_run(run, step: str) -> list[str]:
    """Tag ``run`` as ``step``'s, owned by this process, then end the step's runs whose owner died.

    Returns the ids of the runs it set KILLED.
    """
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run_id = run.info.run_id
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in owner_tags(step).items()])
    return end_runs_of_dead_owners(client, run.info.experiment_id, step, keep=run_id)
