"""Stage 3: evaluate a training run folder.

Reading order: `heldout` (the held-out metrics, which are sae.measure's: the same implementation as
training's summary), `sequences` and `splice` and `downstream` (rerunning the language model with the
SAE spliced in), `dashboard` and `plots`, `run` (one run folder end to end: eval.json, plots,
dashboard; its file names are train.layout's), `compare` (several runs), `export` (SAELens format:
each SAE class maps its own weights, `BaseSAE.to_saelens`), `__main__` (the CLI). Nothing here names
an architecture: what differs by architecture is a method of the SAE class.
"""
