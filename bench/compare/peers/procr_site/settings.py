"""procrastinate (PostgreSQL) through its Django integration."""

from djangobase import *  # noqa: F403
from djangobase import postgres

INSTALLED_APPS = ["procrastinate.contrib.django", "procr_site"]
DATABASES = {"default": postgres()}
