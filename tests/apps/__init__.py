"""Listener modules that tests run in real `amqp-listener` processes (not test files)."""
