"""Generated from protos/inference/ by serving.protos.generate; do not edit."""
