"""Self-supervised methods; importing this package registers all of them in ``METHODS``."""
from ssl_lib.methods.base import METHODS, SSLMethod, UnknownMethodError, get_method, register
from ssl_lib.methods import rotation as _rotation  # noqa: F401  (registers "rotation")
from ssl_lib.methods import simclr as _simclr  # noqa: F401  (registers "simclr")

__all__ = ["METHODS", "SSLMethod", "UnknownMethodError", "get_method", "register"]
