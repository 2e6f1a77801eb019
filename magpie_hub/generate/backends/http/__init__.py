"""Server backends (``tgi``, ``openai``) on one shared base (:mod:`.base`): retries, errors, prompt fit, BOS."""
