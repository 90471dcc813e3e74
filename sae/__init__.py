"""The SAE zoo. Importing the package registers every architecture."""

from sae.base import BaseSAE, SAEConfig, load_sae
from sae.registry import canonical, get, names, register

__all__ = ["BaseSAE", "SAEConfig", "load_sae", "canonical", "get", "names", "register"]
