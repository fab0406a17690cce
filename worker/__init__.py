"""The streamscribe worker: claims sessions from Redis and transcribes them."""
