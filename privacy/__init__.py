"""The image gate: untrusted photos in, clean JPEGs out (metadata rebuilt, faces and plates blurred).

Belongs here: decoding untrusted files in a sandbox child (``decode``, ``isolated``, ``sandbox``),
the metadata inventory and the minimal new EXIF (``metadata``), face and plate detection
(``faces``, ``plates``, ``boxes``), redaction (``blur``) and the gate itself (``anonymize``).

Does not belong here: the vault, subjects, the register or anything else that keeps data about
people (``dataprotection/``), the database, Ray, HTTP. The gate imports nothing of the project
outside this package (an import-linter contract in pyproject.toml says so and is checked).
"""

import logging as _logging

# Pillow's TIFF and EXIF parsers log every tag they read, values included (an artist's name, a
# camera serial), at DEBUG. The gate reads untrusted headers in process (privacy.isolated), so a
# debug log of this service would carry the metadata it exists to remove: keep Pillow's loggers
# at WARNING whatever the root level is.
_logging.getLogger("PIL").setLevel(_logging.WARNING)
