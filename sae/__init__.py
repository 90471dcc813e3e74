"""The SAE zoo. Importing the package registers every architecture (one module each)."""

from sae import batchtopk, gated, jumprelu, matryoshka, route, topk, vanilla  # noqa: F401
from sae.base import BaseSAE, load_sae
from sae.config import SAEConfig, SAESettings
from sae.registry import canonical, get, names, register

__all__ = ["BaseSAE", "SAEConfig", "SAESettings", "load_sae", "canonical", "get", "names", "register"]
