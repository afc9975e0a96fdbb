"""What Airflow learns about this provider without importing any of it.

Airflow calls ``get_provider_info()`` through the ``apache_airflow_provider`` entry point while its
own configuration is still being initialised, so this module must stay plain data: importing
Airflow or any provider module from here would be circular, and one failure here breaks every
``airflow`` command on the machine. Class paths are strings that Airflow imports lazily; the
tests check that each one imports.
"""

from __future__ import annotations

from typing import Any

INTEGRATION = "StudioML"
CONNECTION_TYPE = "studio_rabbitmq"
MESSAGE_KEYS_CONNECTION_TYPE = "studio_message_keys"


def get_provider_info() -> dict[str, Any]:
    """The provider-info dict, validated by the tests against Airflow's ``provider_info.schema.json``."""
    return {
        "package-name": "airflow-provider-studio",
        "name": "StudioML",
        "description": (
            "StudioML experiments on Apache Airflow: run them on GPU Kubernetes pods or locally, "
            "wait on StudioML RabbitMQ and SQS queues, and collect experiment metadata from S3."
        ),
        "integrations": [
            {
                "integration-name": INTEGRATION,
                "external-doc-url": "https://github.com/studioml/studio",
                "tags": ["software"],
            }
        ],
        "operators": [
            {
                "integration-name": INTEGRATION,
                "python-modules": [
                    "airflow_provider_studio.operators.experiment",
                    "airflow_provider_studio.operators.metadata",
                    "airflow_provider_studio.operators.queue_runner",
                ],
            }
        ],
        "sensors": [
            {
                "integration-name": INTEGRATION,
                "python-modules": ["airflow_provider_studio.sensors.queue"],
            }
        ],
        "hooks": [
            {
                "integration-name": INTEGRATION,
                "python-modules": [
                    "airflow_provider_studio.hooks.message_keys",
                    "airflow_provider_studio.hooks.rabbitmq",
                ],
            }
        ],
        "triggers": [
            {
                "integration-name": INTEGRATION,
                "python-modules": ["airflow_provider_studio.triggers.queue"],
            }
        ],
        "plugins": [
            {"name": "studio", "plugin-class": "airflow_provider_studio.plugins.studio.StudioViewPlugin"}
        ],
        "extra-links": ["airflow_provider_studio.links.experiment.StudioArtifactsLink"],
        "connection-types": [
            {
                "connection-type": CONNECTION_TYPE,
                "hook-class-name": "airflow_provider_studio.hooks.rabbitmq.StudioRabbitMQHook",
                "hook-name": "StudioML RabbitMQ",
                # Declarative form (Airflow 3.2+): the UI renders it without importing the hook.
                "conn-fields": {
                    "management_url": {
                        "label": "Management API URL",
                        "description": (
                            "RabbitMQ management API, which runners use to discover queues. "
                            "Leave empty for http(s)://<host>:<port + 10000>."
                        ),
                        "schema": {"type": ["string", "null"]},
                    },
                    "ssl": {
                        "label": "Use TLS (amqps)",
                        "description": "Connect with TLS, verifying the broker's certificate.",
                        "schema": {"type": ["boolean", "null"]},
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": [],
                    "relabeling": {"schema": "Virtual host"},
                    "placeholders": {
                        "host": "rabbitmq.example.com",
                        "port": "5672",
                        "schema": "/",
                        "login": "guest",
                        "management_url": "http://rabbitmq.example.com:15672",
                    },
                },
            },
            {
                "connection-type": MESSAGE_KEYS_CONNECTION_TYPE,
                "hook-class-name": "airflow_provider_studio.hooks.message_keys.StudioMessageKeysHook",
                "hook-name": "StudioML message keys",
                "conn-fields": {
                    "runner_public_key": {
                        "label": "Runner public key (RSA, PEM)",
                        "description": "Requests are encrypted for this key (the runners' ssh-publickey).",
                        "schema": {"type": ["string", "null"]},
                    },
                    "signing_private_key": {
                        "label": "Signing private key (Ed25519, OpenSSH or PEM)",
                        "description": (
                            "Requests are signed with it; runners trust its public key in their "
                            "request-signers Secret."
                        ),
                        "schema": {"type": ["string", "null"], "format": "password"},
                    },
                    "runner_private_key": {
                        "label": "Runner private key (local execution mode only)",
                        "description": (
                            "Only where the runner runs on the worker (execution_mode = local); "
                            "leave empty for Kubernetes, where pods mount it from a Secret."
                        ),
                        "schema": {"type": ["string", "null"], "format": "password"},
                    },
                    "runner_private_key_passphrase": {
                        "label": "Runner private key passphrase (local execution mode only)",
                        "schema": {"type": ["string", "null"], "format": "password"},
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["host", "schema", "login", "password", "port", "extra"],
                    "relabeling": {},
                    "placeholders": {},
                },
            },
        ],
        "config": {
            "studio": {
                "description": "How the StudioML provider runs experiments and links to their artifacts.",
                "options": {
                    "execution_mode": {
                        "description": (
                            "How StudioExperimentOperator and StudioQueueRunnerOperator run the "
                            "studio-runner: ``kubernetes`` starts a runner pod per task, ``local`` "
                            "runs it as a child process of the worker (development and CI). "
                            "Environment variable: AIRFLOW__STUDIO__EXECUTION_MODE."
                        ),
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "local",
                        "default": "kubernetes",
                    },
                    "runner_image": {
                        "description": (
                            "Container image of the studio-runner for Kubernetes runs, required in "
                            "that mode (no registry publishes one): build it with ``make image`` "
                            "(``localhost/studio-runner:<version>``), push it to your registry and "
                            "name it here. Environment variable: AIRFLOW__STUDIO__RUNNER_IMAGE."
                        ),
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "registry.example.com/studio/studio-runner:0.1.0",
                        "default": "",
                    },
                    "artifacts_link_template": {
                        "description": (
                            "URL of an experiment's artifacts, shown as an extra link on the task. "
                            "``{bucket}``, ``{prefix}`` (``experiments/<key>/``), ``{key}`` and "
                            "``{endpoint}`` are replaced by the experiment's values."
                        ),
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "https://minio.example.com/browser/{bucket}/{prefix}",
                        "default": "https://s3.console.aws.amazon.com/s3/buckets/{bucket}?prefix={prefix}",
                    },
                    "campaign_aws_conn_id": {
                        "description": (
                            "The AWS connection the Studio view reads ENN campaigns from S3 with "
                            "(the one the campaign DAG uses). Environment variable: "
                            "AIRFLOW__STUDIO__CAMPAIGN_AWS_CONN_ID."
                        ),
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "aws_default",
                        "default": "aws_default",
                    },
                    "local_working_dir": {
                        "description": (
                            "Working directory for ``local`` execution mode; empty means "
                            "``$AIRFLOW_HOME/studio-runner/work``."
                        ),
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/var/lib/studio/work",
                        "default": "",
                    },
                    "local_cache_dir": {
                        "description": (
                            "Artifact and virtualenv cache for ``local`` execution mode; empty means "
                            "``$AIRFLOW_HOME/studio-runner/cache``, kept between tasks and runs so "
                            "each virtualenv is built once."
                        ),
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/var/cache/studio",
                        "default": "",
                    },
                    "env_cache_uri": {
                        "description": (
                            "Where runners share packed virtualenvs, ``s3://host[:port]/bucket/prefix`` "
                            "(the runner's ``--env-cache-uri``): a fresh pod restores its request's "
                            "environment from there instead of installing it. Empty means "
                            "``studio-env-cache/`` in the experiment's results bucket (the queue "
                            "runner: in the AWS connection's ``service_config.s3.bucket_name``); "
                            "``off`` turns the cache off. An operator's ``env_cache_uri`` wins."
                        ),
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "s3://s3.eu-west-1.amazonaws.com/studio-runner-cache/envs",
                        "default": "",
                    },
                    "env_cache_volume": {
                        "description": (
                            "Node-local cache of packed virtualenvs for runner pods, consulted before "
                            "``env_cache_uri`` and mounted at ``/env-cache``: an absolute path is a "
                            "hostPath (writable by GID 10001), anything else a PersistentVolumeClaim's "
                            "name. Empty means none. An operator's ``env_cache_volume`` wins."
                        ),
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/var/cache/studio-runner/envs",
                        "default": "",
                    },
                },
            }
        },
    }
