"""Stage 1: run a Hugging Face model over text and write residual-stream activations to a cache.

    python -m harvest [--config configs/default.yaml] [--overwrite] [section.key=value ...]

Modules, in reading order: `text` (documents -> packed sequences; the text side), `model` (load a
model, find its blocks, hooks that stop the forward at the deepest requested block), `windows`
(shuffle windows and their batches), `capture` (forward a window, hand its rows to the writer,
overlapped on CUDA), `identity` (what makes two caches the same), `run` (the loop: fresh, resume,
extend; what may happen to the output folder is the cache package's decision, cache.folder),
`distributed` (torchrun ranks), `__main__` (the command line).
"""

from harvest.model import HarvestError, LoadedModel, load_model, parse_layers
from harvest.run import HarvestSummary, harvest

__all__ = ["HarvestError", "HarvestSummary", "LoadedModel", "harvest", "load_model", "parse_layers"]
