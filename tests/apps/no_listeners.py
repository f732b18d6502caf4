"""A module that defines no Listener: `amqp-listener run` must refuse it."""

from pydantic import BaseModel


class NotAListener(BaseModel):
    n: int
