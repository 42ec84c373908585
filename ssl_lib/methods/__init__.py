"""Self-supervised methods; importing this package registers all of them in ``METHODS``."""
from ssl_lib.methods import autoencoder as _autoencoder  # noqa: F401
from ssl_lib.methods import autoregressive as _autoregressive  # noqa: F401
from ssl_lib.methods import barlow_twins as _barlow_twins  # noqa: F401
from ssl_lib.methods import byol as _byol  # noqa: F401
from ssl_lib.methods import colorization as _colorization  # noqa: F401
from ssl_lib.methods import dino as _dino  # noqa: F401
from ssl_lib.methods import inpainting as _inpainting  # noqa: F401
from ssl_lib.methods import jigsaw as _jigsaw  # noqa: F401
from ssl_lib.methods import mae as _mae  # noqa: F401
from ssl_lib.methods import moco as _moco  # noqa: F401
from ssl_lib.methods import rotation as _rotation  # noqa: F401  (registers "rotation")
from ssl_lib.methods import simclr as _simclr  # noqa: F401  (registers "simclr")
from ssl_lib.methods import simsiam as _simsiam  # noqa: F401
from ssl_lib.methods import vicreg as _vicreg  # noqa: F401
from ssl_lib.methods.base import METHODS, MethodOptions, SSLMethod, UnknownMethodError, get_method, register

__all__ = ["METHODS", "MethodOptions", "SSLMethod", "UnknownMethodError", "get_method", "register"]
