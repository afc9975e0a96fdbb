"""Why a StudioML queue could not be read, one class per thing the user has to fix.

Each message names the queue, the broker and what to change. The classes are
``AirflowException`` subclasses so that a failing sensor reads like any other Airflow failure
and honours ``retries``; code that wants to tell the causes apart catches the subclass.
"""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException


class StudioQueueError(AirflowException):
    """A StudioML queue could not be checked."""


class QueueNotFound(StudioQueueError):
    """The queue does not exist (yet): a wrong name, or no StudioML client has created it."""


class BrokerAuthError(StudioQueueError):
    """The broker refused the credentials, the virtual host or a permission."""


class BrokerUnreachable(StudioQueueError):
    """No usable answer from the broker: wrong host or port, network, TLS, or broker down."""
