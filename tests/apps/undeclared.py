"""A listener declared wrongly (no `subscribes_to`): importing this module fails."""

from listener import Listener


class NoSubscription(Listener):
    def handle(self, message: dict) -> None:
        pass
