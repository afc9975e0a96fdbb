"""The runner image: no registry publishes one, so Kubernetes mode must be told which to run.

A default naming an unpublished image would only surface on the cluster, as ImagePullBackOff
after KPO's start-up timeout; these tests pin the clear error that replaces it, and that local
mode (which runs the runner on the worker) needs no image at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_provider_studio.operators.experiment import StudioExperimentOperator
from airflow_provider_studio.operators.queue_runner import StudioQueueRunnerOperator
from airflow_provider_studio.operators.runner_pod import DEFAULT_RUNNER_IMAGE, NO_RUNNER_IMAGE
from devtools import image

IMAGE = "registry.example.com/studio/studio-runner:0.1.0"

OPERATORS: dict[str, Callable[..., Any]] = {
    "experiment": lambda **kw: StudioExperimentOperator(task_id="train", script="train.py", **kw),
    "queue_runner": lambda **kw: StudioQueueRunnerOperator(task_id="drain", queue_match="^rmq_a_.*$", **kw),
}


@pytest.fixture(params=sorted(OPERATORS))
def make(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    monkeypatch.delenv("AIRFLOW__STUDIO__RUNNER_IMAGE", raising=False)
    monkeypatch.delenv("AIRFLOW__STUDIO__EXECUTION_MODE", raising=False)
    return OPERATORS[request.param]


def test_there_is_no_unpublished_default() -> None:
    assert DEFAULT_RUNNER_IMAGE == ""
    for advice in ("make image", image.IMAGE_NAME, "podman push", "[studio] runner_image", "execution_mode"):
        assert advice in NO_RUNNER_IMAGE


def test_explicit_kubernetes_mode_without_an_image_fails_at_construction(make: Callable[..., Any]) -> None:
    with pytest.raises(ValueError, match="no runner image for Kubernetes mode") as raised:
        make(execution_mode="kubernetes")
    assert "make image" in str(raised.value)


def test_kubernetes_mode_from_the_config_fails_before_any_pod_is_asked_for(make: Callable[..., Any]) -> None:
    """The mode is read on the worker, so the error comes when KPO builds the pod to create."""
    op = make()  # [studio] execution_mode defaults to kubernetes
    assert op.image is None
    with pytest.raises(AirflowFailException, match="no runner image for Kubernetes mode"):
        op.build_pod_request_obj(None)


def test_the_configured_image_is_used(make: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__STUDIO__RUNNER_IMAGE", IMAGE)
    assert make(execution_mode="kubernetes").image == IMAGE
    monkeypatch.setenv("AIRFLOW__STUDIO__RUNNER_IMAGE", "  ")
    with pytest.raises(ValueError, match="no runner image"):
        make(execution_mode="kubernetes")
    assert make(execution_mode="kubernetes", runner_image=IMAGE).image == IMAGE


def test_local_mode_needs_no_image(make: Callable[..., Any]) -> None:
    assert make(execution_mode="local").image is None
