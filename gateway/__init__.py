"""gateway: an authenticating reverse proxy for apps that know nothing about tokens."""

__version__ = "0.1.0"
