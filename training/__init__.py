"""Graft's training sidecar: scenario-based fine-tuning from image folders to versioned SavedModels."""

__version__ = "0.1.0"
