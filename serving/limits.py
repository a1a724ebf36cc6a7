"""Default limits on what one request may carry, shared by the core, both protocols and the flags.

Free of TensorFlow and of any protocol library, so the command-line parser can
show them without loading either.
"""

from __future__ import annotations

# --max_request_bytes: the largest REST body (after gunzip) and gRPC message.
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
# --max_image_pixels: large enough for any real photo, small enough that one request
# cannot exhaust memory.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# --rest_api_timeout_in_ms, TF Serving's default.
DEFAULT_REST_TIMEOUT_MS = 30_000
