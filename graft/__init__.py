"""Graft's shared ground: what graft-train writes and graft-serve reads (``graft.contract``)."""
