"""Pruning and decoding methods behind one interface; importing this package registers them all."""
from methods.base import REGISTRY, Budget, LayerBudgetMethod, Method, MethodError, ModelShape, build_method  # noqa: F401
from methods import controls, fastv, pool, sparsevlm, visionzip  # noqa: F401  (registration)
from methods.twigvlm import ttp  # noqa: F401,E402  (registration)
