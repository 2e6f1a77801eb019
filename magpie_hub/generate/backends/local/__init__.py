"""The local backend: ``transformers`` with per-row sampling and continuous batching (:mod:`.batching`)."""
