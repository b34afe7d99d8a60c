"""`python -m relkd.demo` (see relkd.demo.cli, or --help)."""
import os
import sys

from .cli import main


def _passive_openmp() -> None:
    """Re-runs this command with OMP_WAIT_POLICY=PASSIVE unless it is set.
    OpenMP reads it when torch loads, before this code runs. On a machine
    shared with other jobs, spinning OpenMP threads made the demo over ten
    times slower (measured: 272 s against 22 s for --quick)."""
    if "OMP_WAIT_POLICY" in os.environ or not sys.executable:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "relkd.demo", *sys.argv[1:]])


if __name__ == "__main__":
    _passive_openmp()
    main()
