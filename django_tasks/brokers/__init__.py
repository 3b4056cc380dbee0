"""Brokers: Redis (``redis://`` BROKER_URL) and the database (the default)."""

from __future__ import annotations

from django.utils.module_loading import import_string

from ..conf import BackendConfig
from .base import Broker, Delivery, Outgoing, PollingWaiter, ResultWaiter

BROKER_CLASSES = {
    "redis": "django_tasks.brokers.redis.RedisBroker",
    "database": "django_tasks.brokers.database.DatabaseBroker",
}


def create_broker(config: BackendConfig) -> Broker:
    """The broker the configuration names."""
    broker_class: type[Broker] = import_string(BROKER_CLASSES[config.broker_kind])
    return broker_class(config)


__all__ = ["Broker", "Delivery", "Outgoing", "PollingWaiter", "ResultWaiter", "create_broker"]
