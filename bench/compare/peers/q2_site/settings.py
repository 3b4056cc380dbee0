"""django-q2 with its ORM broker on PostgreSQL (results in the same database)."""

from djangobase import *  # noqa: F403
from djangobase import postgres

INSTALLED_APPS = ["django_q", "q2_site"]
DATABASES = {"default": postgres()}
Q_CLUSTER = {
    "name": "bench",
    "orm": "default",  # the ORM broker; it polls every 0.2 s (the default "poll")
    "workers": 2,
    # Keep every successful result, as the other libraries do (the default keeps the last 250).
    "save_limit": 0,
    "timeout": 60,
    "retry": 120,
}
