"""ray_lit.worker: what runs inside each Ray worker actor (one DDP rank)."""

import time as _time

# When this process began importing the worker side: in a Ray actor process that is the
# unpickling of the actor class, so it opens the "imports" phase of ``Worker.startup_timings``.
IMPORT_STARTED_AT: float = _time.time()
