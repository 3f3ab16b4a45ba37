"""The HTTP API (`/v1`), served by `slimmoa api`; the app factory is `orchestrator.api.app.create_app`.

Kept empty so that the CLI and the client can import the API's request and response bodies
(`orchestrator.api.bodies`) without loading the server.
"""
