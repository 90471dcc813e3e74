"""The SAE zoo. Importing the package registers every architecture (one module each).

Reading order: `config` (the one typed description of an SAE's settings, which the config loader
validates and the CLIs' --help lists), `registry` (name -> class), `base` (BaseSAE: the contract and
every training hook with its default), `collective` (what an SAE needs from the other ranks of a
data-parallel run), `selection`, `sparse_decode`, `auxk` (the TopK family's machinery), one module per
architecture (`vanilla`, `gated`, `jumprelu`, `topk`, `batchtopk`, `matryoshka`, `route`), and
`metrics` + `measure` (the one implementation of the held-out metrics, for training's summary and for
stage 3). A new architecture is one module here (a class with `@register`), a preset and its tests.
"""

from sae import batchtopk, gated, jumprelu, matryoshka, route, topk, vanilla  # noqa: F401
from sae.base import BaseSAE, load_sae
from sae.config import SAEConfig, SAESettings
from sae.registry import canonical, get, names, register

__all__ = ["BaseSAE", "SAEConfig", "SAESettings", "load_sae", "canonical", "get", "names", "register"]
