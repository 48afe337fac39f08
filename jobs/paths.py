"""`fipray paths` for `ray job submit` (a thin wrapper over the same command-line runner, see jobs/_job.py).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/paths.py [arguments of fipray paths]
"""

import sys

from _job import run

if __name__ == "__main__":
    sys.exit(run("paths", "jobs/configs/ensemble_digits.yaml"))
