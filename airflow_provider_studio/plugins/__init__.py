"""The Studio view: ENN campaigns, generations, genomes and experiments in the Airflow UI.

``studio.StudioViewPlugin`` registers ``api.app`` (data and pages, mounted on the API server at
``/studio``) and the UI's tabs; ``campaigns`` reads what the DAG and the runner stored in S3.
"""
