"""pytest fixtures for testing listeners without RabbitMQ (see `listener.testing`)."""
