"""Data parallelism as the library sees it: the collectives it makes, and DDP/FSDP2 models."""
