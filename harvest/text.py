"""The text side of harvest, in one import: sources, tokenizer, packing.

    from harvest.text import (PackedSequence, load_tokenizer, resolve_model_path, iter_documents,
                              packed_sequences, source_fingerprint, packing_identity, TextError)

Implementation: sources.py (which source, documents, fingerprint), local_files.py, pydocs.py
("python-docs"), tokenization.py (model folder, tokenizer, special tokens), packing.py.
"""

from harvest.errors import TextError
from harvest.packing import SPLITS, PackedSequence, packed_sequences, packing_identity, split_of
from harvest.sources import iter_documents, source_fingerprint
from harvest.tokenization import (
    SpecialLayout,
    load_tokenizer,
    resolve_model_path,
    special_layout,
    tokenizer_description,
)

__all__ = [
    "SPLITS", "PackedSequence", "SpecialLayout", "TextError", "iter_documents", "load_tokenizer",
    "packed_sequences", "packing_identity", "resolve_model_path", "source_fingerprint", "special_layout",
    "split_of", "tokenizer_description",
]
