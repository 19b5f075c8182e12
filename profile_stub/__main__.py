"""``python -m profile_stub``: serve the ProfileService.

The eligibility of a batch allocates a few objects per row by the ten thousand (rows, profiles,
verdicts, messages), nearly all freed by reference counting. With the interpreter's default thresholds
the cyclic garbage collector would run every 700 allocations and scan the young objects of the whole
batch again and again (a fifth of CheckEligibility's time, measured with bench/profile.py). The server
process therefore freezes what it imported (never scanned again) and collects less often; a process
that imports profile_stub (the tests) keeps the defaults.

Its PostgreSQL sessions run in UTC (``PGTZ``, unless the environment sets another zone): timestamps then
come back with ``datetime.timezone.utc``, which psycopg attaches for nothing and ``as_utc`` keeps as it
is, where a named zone (a server's ``Etc/UTC``) costs a conversion by the driver and another by
``as_utc`` per value (0.9 against 1.5 us per row of two timestamps, and 0.1 against 0.5 us per
``as_utc``, measured): a few per recipient in every eligibility batch. Stored instants do not change.
"""

import gc
import os

from carillon_chassis.entrypoint import run_service
from profile_stub.app import build_server
from profile_stub.settings import ProfileSettings

# Young objects collected every 100,000 net allocations, instead of every 700.
GC_THRESHOLDS = (100_000, 20, 10)

if __name__ == "__main__":
    os.environ.setdefault("PGTZ", "UTC")
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    run_service(ProfileSettings, build_server, "Carillon profile_stub: profiles, consent and eligibility.")
