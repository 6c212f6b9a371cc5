"""The persistence consumer (``chatstream consume``) and the outbox relay."""
