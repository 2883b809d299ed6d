"""Data: corpora -> token files, packing into training sequences (and SFT data in sibling modules)."""
