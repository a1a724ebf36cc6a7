"""Generated from protos/graft/ by serving.protos.generate; do not edit."""
