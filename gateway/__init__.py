"""The streamscribe gateway: TLS WebSocket front door that writes audio to Redis."""
