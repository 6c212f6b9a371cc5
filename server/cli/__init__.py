"""The `chatstream` commands beyond running the service: operator views of Redis and a terminal client.

Each module holds one command (or group) and imports only what that command needs: none of them
imports `server.app`, whose import of the Anthropic SDK alone takes seconds.
"""
