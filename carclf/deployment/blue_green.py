"""Blue/green rollout on an Azure ML managed online endpoint, the way Azure recommends.

The endpoint is created when missing (key auth); the new model goes into the slot (`blue`/`green`) that carries
no traffic, is smoke-tested with a real photo through the `azureml-model-deployment` header, and only then gets
the traffic (all of it, or a canary share). A failed smoke test leaves the traffic as it was.
"""

from __future__ import annotations

import json
import logging
import pathlib

from carclf.deployment.azure_config import build_endpoint_config, write_config
from carclf.deployment.errors import DeployError
from carclf.deployment.plugin_calls import azure_error_in_chain, call_plugin, is_not_found, one_line

log = logging.getLogger(__name__)

# Blue/green slots of a managed endpoint: the new model goes into the one that carries no traffic.
DEPLOYMENT_SLOTS = ("blue", "green")


def check_rollout(traffic, delete_old, smoke_image, endpoint_auth) -> bytes:
    """Offline checks of the blue/green parameters; returns the smoke-test photo's bytes."""
    if isinstance(traffic, bool) or not isinstance(traffic, int) or not 1 <= traffic <= 100:
        raise DeployError(
            f"traffic must be a whole percentage from 1 to 100 (the new deployment's share), got {traffic!r}"
        )
    if delete_old and traffic != 100:
        raise DeployError(
            f"delete_old needs traffic=100 (a {traffic}% canary still sends the rest to the old deployment)"
        )
    build_endpoint_config(endpoint_auth)
    if smoke_image:
        path = pathlib.Path(smoke_image)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DeployError(f"smoke_image {str(path)!r}: cannot read ({exc.strerror or exc})") from None
        if not data:
            raise DeployError(f"smoke_image {str(path)!r} is empty")
        return data
    return default_smoke_photo()


def default_smoke_photo() -> bytes:
    """A real JPEG of a car-like scene (the sample-data renderer), for the smoke test."""
    import io

    import numpy as np
    from PIL import Image

    from carclf.data.sample_data import render_photo

    pixels, _box = render_photo(0, np.random.default_rng(0), 96, 128)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _find_endpoint(client, name: str) -> dict | None:
    """The endpoint as the plugin describes it, or None when Azure answers 404."""
    try:
        return client.get_endpoint(name)
    except Exception as exc:
        if is_not_found(exc):
            return None
        azure = azure_error_in_chain(exc)
        if azure is None:
            raise
        raise DeployError(f"looking up endpoint {name!r}: {type(azure).__name__}: {one_line(azure)}") from None


def _traffic_of(endpoint: dict | None) -> dict:
    properties = (endpoint or {}).get("properties") or {}
    return {k: int(v) for k, v in (properties.get("traffic") or {}).items()}


def choose_slot(traffic: dict, existing: list[str]) -> str:
    """The blue/green slot for the new model: the one that carries no traffic (blue on a new endpoint)."""
    free = [slot for slot in DEPLOYMENT_SLOTS if traffic.get(slot, 0) == 0]
    if not free:
        raise DeployError(
            f"both {' and '.join(DEPLOYMENT_SLOTS)} carry traffic ({_traffic_text(traffic)}): finish the canary "
            "first (deploy again with traffic=100) or move the traffic back in Azure ML studio"
        )
    # Prefer a slot that does not exist yet, then one idle at 0% (left over by a failed rollout).
    return next((slot for slot in free if slot not in existing), free[0])


def split_traffic(old: dict, new: str, share: int) -> dict:
    """`share`% to `new`, the rest to the deployments that had traffic, in their old proportions."""
    live = {k: v for k, v in old.items() if v > 0 and k != new}
    if share == 100 or not live:
        return {**{k: 0 for k in old if k != new}, new: 100}
    rest = 100 - share
    total = sum(live.values())
    scaled = {k: rest * v // total for k, v in live.items()}
    biggest = max(live, key=live.get)
    scaled[biggest] += rest - sum(scaled.values())  # the rounding remainder
    return {**{k: 0 for k in old if k != new}, **scaled, new: share}


def _traffic_text(traffic: dict) -> str:
    return ", ".join(f"{k}={v}%" for k, v in sorted(traffic.items())) or "no traffic"


def smoke_test(client, endpoint: str, deployment: str, photo: bytes) -> dict:
    """Score one photo on `deployment` alone (the plugin sends the azureml-model-deployment header);
    returns the first answer row or raises DeployError saying why, in one line."""
    import base64

    import pandas as pd

    frame = pd.DataFrame({"image": [base64.b64encode(photo).decode("ascii")]})
    what = f"smoke test of deployment {deployment!r} on endpoint {endpoint!r}"
    try:
        answer = client.predict(deployment_name=deployment, df=frame, endpoint=endpoint)
    except Exception as exc:
        azure = azure_error_in_chain(exc) or exc
        status = getattr(getattr(azure, "response", None), "status_code", None)
        text = one_line(getattr(azure, "message", None) or azure) or type(azure).__name__
        # Azure's scoring script hides the model's exception behind a fixed text: say where the cause is.
        logs = f"az ml online-deployment get-logs -e {endpoint} -n {deployment}"
        raise DeployError(
            f"{what} failed: {'HTTP ' + str(status) + ': ' if status else ''}{text} (deployment log: {logs})"
        ) from None
    rows = answer.to_dict(orient="records") if hasattr(answer, "to_dict") else list(answer)
    if len(rows) != 1:
        raise DeployError(f"{what} failed: expected 1 answer for 1 photo, got {len(rows)}")
    row = rows[0]
    error = row.get("error")
    if isinstance(error, str) and error.strip():
        raise DeployError(f"{what} failed: the model answered error: {one_line(error)}")
    if row.get("label") in (None, "") or (isinstance(row.get("label"), float) and row["label"] != row["label"]):
        raise DeployError(f"{what} failed: the answer has no label ({one_line(json.dumps(row, default=str))[:200]})")
    return row


def roll_out(client, name, model_uri, config_path, folder, photo, traffic, delete_old, endpoint_auth) -> dict:
    endpoint = _find_endpoint(client, name)
    created_endpoint = endpoint is None
    if created_endpoint:
        endpoint_file = write_config(build_endpoint_config(endpoint_auth), folder, "endpoint")
        log.info("creating managed online endpoint %r (%s auth)", name, endpoint_auth)
        endpoint = call_plugin(
            f"creating endpoint {name!r}",
            client.create_endpoint,
            name,
            config={"endpoint-config-file": str(endpoint_file)},
        )
    before = _traffic_of(endpoint)
    existing = [
        d["name"] for d in call_plugin(f"listing the deployments of {name!r}", client.list_deployments, endpoint=name)
    ]
    slot = choose_slot(before, existing)
    deploy_config = {"deploy-config-file": str(config_path)}
    if slot in existing:
        log.info("updating idle deployment %r of %r with %s (0%% traffic)", slot, name, model_uri)
        call_plugin(
            f"updating deployment {slot!r}",
            client.update_deployment,
            slot,
            model_uri=model_uri,
            config=deploy_config,
            endpoint=name,
        )
    else:
        log.info("creating deployment %r of %r with %s (0%% traffic)", slot, name, model_uri)
        call_plugin(
            f"creating deployment {slot!r}",
            client.create_deployment,
            slot,
            model_uri,
            config=deploy_config,
            endpoint=name,
        )
    try:
        answer = smoke_test(client, name, slot, photo)
    except DeployError as exc:
        raise DeployError(f"{exc}; traffic unchanged ({_traffic_text(before)})") from None
    log.info("smoke test of %r passed: %s", slot, answer.get("label"))
    after = split_traffic({**{d: 0 for d in existing}, **before}, slot, traffic)
    traffic_file = write_config(build_endpoint_config(traffic=after), folder, "traffic")
    endpoint = call_plugin(
        f"moving traffic of {name!r} to {slot!r}",
        client.update_endpoint,
        name,
        config={"endpoint-config-file": str(traffic_file)},
    )
    deleted = []
    if delete_old:
        for old in existing:
            if old != slot and after.get(old, 0) == 0:
                call_plugin(f"deleting old deployment {old!r}", client.delete_deployment, old, endpoint=name)
                deleted.append(old)
    properties = endpoint.get("properties") or {} if isinstance(endpoint, dict) else {}
    return {
        "action": "created endpoint" if created_endpoint else ("canary" if traffic < 100 else "switched"),
        "endpoint": name,
        "deployment": slot,
        "traffic_before": before,
        "traffic": _traffic_of(endpoint) or after,
        "deleted": deleted,
        "scoring_uri": properties.get("scoringUri"),
        "smoke_test": {k: answer[k] for k in ("label", "prob") if k in answer},
    }
