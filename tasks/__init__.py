"""Prefect tasks: thin doors around the CLI and `dvc repro`; one task per stage, same names."""
