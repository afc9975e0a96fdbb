"""Evolutionary neural networks for the example DAGs: genomes, breeding, and the workload.

Pure Python (pydantic only), so DAG files, the runner's tests and notebooks share it; the
``workload/`` folder is the StudioML workspace and imports nothing from here.
"""
