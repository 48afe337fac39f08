"""`fipray serve` for `ray job submit` (a thin wrapper over the same command-line runner, see jobs/_job.py).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/serve.py [arguments of fipray serve]
"""

import sys

from _job import run

if __name__ == "__main__":
    sys.exit(run("serve", ""))
