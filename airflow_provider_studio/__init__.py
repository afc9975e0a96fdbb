"""Apache Airflow provider for StudioML and evolutionary neural network experiments."""

from __future__ import annotations

__version__ = "0.1.0"
