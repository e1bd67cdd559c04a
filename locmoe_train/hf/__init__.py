"""Hugging Face side of the export (``locmoe-train export-hf``).

``tokenizer.py`` converts our SentencePiece tokenizer; ``configuration_locmoe.py``
and ``modeling_locmoe.py`` are the custom model for checkpoints Mixtral cannot
express. Those two files are copied next to the exported weights and loaded
with ``trust_remote_code=True``, so they import only torch and transformers,
never this package.
"""
