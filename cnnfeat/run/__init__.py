"""Run plumbing: the entry points (``cnnfeat-train``, ``cnnfeat-explore``), config and instantiation, resume,
status, atomic IO, checkpoints, the run-directory lock, progress, seeding and the Lightning import shim."""
