"""amqp-listener: reliable background work and event handling on RabbitMQ.

Everything a user writes is importable from here:

    from listener import Listener, Retry, Reject, PublishError
"""

from listener import jobs
from listener.apublisher import AsyncPublisher, apublish
from listener.errors import (
    AuthenticationFailed,
    BrokerError,
    BrokerUnreachable,
    ConfigurationError,
    InvalidMessage,
    ListenerDefinitionError,
    ListenerError,
    PublishConnectionLost,
    PublishError,
    PublishNacked,
    PublishRefused,
    PublishTimeout,
    PublishUnreachable,
    Reject,
    Retry,
    TopologyMismatch,
    Unroutable,
)
from listener.listener import Listener
from listener.middleware import Delivery, Middleware, add_middleware
from listener.publisher import Publisher, publish
from listener.settings import Settings

__version__ = "0.1.0"

__all__ = [
    "AsyncPublisher",
    "AuthenticationFailed",
    "BrokerError",
    "BrokerUnreachable",
    "ConfigurationError",
    "Delivery",
    "InvalidMessage",
    "Listener",
    "ListenerDefinitionError",
    "ListenerError",
    "Middleware",
    "PublishConnectionLost",
    "PublishError",
    "PublishNacked",
    "PublishRefused",
    "PublishTimeout",
    "PublishUnreachable",
    "Publisher",
    "Reject",
    "Retry",
    "Settings",
    "TopologyMismatch",
    "Unroutable",
    "__version__",
    "add_middleware",
    "apublish",
    "jobs",
    "publish",
]
