"""The Fisher estimation (mirrors ``src/fisher``): options, batches, outputs, recording, rule checks,
the exact fallback and the Kronecker sites; one entry for every structure (:mod:`.api`)."""
