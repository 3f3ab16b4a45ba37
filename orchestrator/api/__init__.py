"""The HTTP API (`/v1`), served by `slimmoa api`; the app factory is `orchestrator.api.app.create_app`.

Kept empty so that the CLI and the client can import the API's schemas without loading the server.
"""
