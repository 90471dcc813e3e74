"""Run inside the separate sae-lens environment (.venv-saelens): load each exported SAE with
sae_lens.SAE.load_from_disk and write its encode/decode outputs on the given inputs.

    python saelens_check.py WORK_DIR     reads WORK_DIR/<name>/ (exported) and WORK_DIR/inputs.safetensors
"""

import sys
from pathlib import Path

import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file

work = Path(sys.argv[1])
inputs = load_file(str(work / "inputs.safetensors"))
out = {}
for folder in sorted(p for p in work.iterdir() if p.is_dir()):
    sae = SAE.load_from_disk(str(folder))
    with torch.no_grad():
        f = sae.encode(inputs["x"])
        out[f"{folder.name}.encode"] = f
        out[f"{folder.name}.decode"] = sae.decode(f)
save_file(out, str(work / "outputs.safetensors"))
