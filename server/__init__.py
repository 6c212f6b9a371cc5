"""chatstream server: gRPC ChatService, persistence consumer and relay."""
