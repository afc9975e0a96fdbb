"""Fixtures shared by the provider's operator tests."""

from __future__ import annotations

import pytest
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import models as k8s


@pytest.fixture
def pending_pods(monkeypatch: pytest.MonkeyPatch) -> list[k8s.V1Pod]:
    """The pods KPO asks the cluster for, recorded and left Pending: no API server is needed, and
    a deferrable operator defers to its trigger as it would on a cluster."""
    created: list[k8s.V1Pod] = []

    def get_or_create_pod(self, pod_request_obj, context):
        created.append(pod_request_obj)
        pod_request_obj.status = k8s.V1PodStatus(phase="Pending")
        return pod_request_obj

    monkeypatch.setattr(KubernetesPodOperator, "get_or_create_pod", get_or_create_pod)
    return created
