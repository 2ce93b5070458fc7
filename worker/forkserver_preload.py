"""What billiard's fork server imports at its start (``worker.pool``): the warm engine and the reaper.

Importing this module anywhere else would do the same to that process; only the fork server does.
"""

from worker.forkserver import preload

preload()
