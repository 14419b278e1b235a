"""Bytes on disk: run files (manifests, log segments, checkpoints, code versions) and the DuckDB store."""
