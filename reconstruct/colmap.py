"""Import pycolmap without letting it take over the process's signals.

pycolmap's module init installs glog's failure signal handler, which catches SIGTERM (and
SIGSEGV, SIGABRT, ...), prints C stack frames and kills the process. A process that imports it
after setting up its own shutdown (uvicorn's workers, a Ray worker, the CLI's Ctrl-C and SIGTERM
handling) then dies on a plain ``kill`` without running its shutdown: uploads cut mid-request,
runners not drained. :func:`import_pycolmap` imports it and puts back the SIGTERM handler Python
had, and Python's faulthandler if it was on. Entry points call it before anything else imports
pycolmap; later ``import pycolmap`` statements then find the module loaded and change nothing.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
import threading
from types import ModuleType

log = logging.getLogger(__name__)


def import_pycolmap() -> ModuleType:
    """pycolmap, imported with the process's SIGTERM handling (and faulthandler) kept.

    Only the main thread may set signal handlers: imported first from another thread, glog's
    handlers stay (logged at debug level)."""
    if "pycolmap" in sys.modules:
        return sys.modules["pycolmap"]
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    fault = faulthandler.is_enabled()
    import pycolmap

    if not main:
        log.debug("pycolmap imported off the main thread: glog's signal handlers stay")
        return pycolmap
    # None: a handler Python did not install (it cannot be put back from here); leave it.
    if before is not None:
        signal.signal(signal.SIGTERM, before)
    if fault:
        faulthandler.enable()
    return pycolmap
