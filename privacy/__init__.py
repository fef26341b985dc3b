"""Privacy gate and data-protection machinery. Knows nothing of Ray or HTTP."""

import logging as _logging

# Pillow's TIFF and EXIF parsers log every tag they read, values included (an artist's name, a
# camera serial), at DEBUG. The gate reads untrusted headers in process (privacy.isolated), so a
# debug log of this service would carry the metadata it exists to remove: keep Pillow's loggers
# at WARNING whatever the root level is.
_logging.getLogger("PIL").setLevel(_logging.WARNING)
