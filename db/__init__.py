"""The record: SQLAlchemy models, sessions, migrations and the queries the stages use.

This package imports neither `orchestrator` nor `workers`: sessions take a URL, queries take a
session and ids.
"""
