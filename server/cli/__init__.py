"""The `chatstream` commands beyond running the service: operator views of Redis, API keys, a terminal client.

Each module holds one command (or group) and imports only what that command needs: none of them
imports `server.app`, whose import of the Anthropic SDK alone takes seconds. Run from a project
folder where `chatstream dev` runs, they reach it with no setup (`server.devenv`).
"""
