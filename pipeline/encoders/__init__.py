"""Encoder families: ``base`` (the contract every encoder fulfils) and one file per stock transformers family."""
