"""Test-session environment, for the unit tests and for the notebooks run by nbval alike.

Before anything is collected: artifacts go to a fresh temporary DPO_LAB_HOME (never data/cache)
and figures and results tables beside it (never the committed figures/ and data/results/),
the profile is `ci` (so notebooks run at test scale) and the device is the CPU. Notebook kernels
inherit this environment, and so reuse the `ci` artifacts the unit tests already built.
"""

import os
import tempfile


def pytest_configure(config):
    os.environ["DPO_LAB_HOME"] = tempfile.mkdtemp(prefix="dpo_lab_home_")
    os.environ["DPO_LAB_FIGURES"] = os.path.join(os.environ["DPO_LAB_HOME"], "figures")
    os.environ["DPO_LAB_RESULTS"] = os.path.join(os.environ["DPO_LAB_HOME"], "results")
    os.environ["DPO_LAB_PROFILE"] = "ci"
    os.environ["DPO_LAB_DEVICE"] = "cpu"
    # One intra-op thread: the test models are tiny, and two threads contending with another process
    # on a 2-core machine made CPU training ~20x slower. Set before torch is imported (kernels inherit it).
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_unconfigure(config):
    import shutil

    shutil.rmtree(os.environ.get("DPO_LAB_HOME", ""), ignore_errors=True)


LONGEST_TEST_FILES = ("test_smol.py",)
"""Test files as long as a notebook (the real SmolLM2 weights): handed out first, with the notebooks."""


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the notebooks (stable: each notebook's cells keep their order), then the
    rest: pytest-xdist hands out files in this order, so two workers finish closer together."""
    items.sort(key=lambda item: 0 if item.path.name in LONGEST_TEST_FILES else 1 if item.path.suffix == ".ipynb"
               else 2)


try:
    from xdist.scheduler import LoadFileScheduling
except ImportError:  # without pytest-xdist the suite runs in one process and needs no scheduler
    LoadFileScheduling = None

if LoadFileScheduling is not None:
    class NotebookWithItsSolutions(LoadFileScheduling):
        """``--dist loadfile``, except that a notebook and its solution notebook form one work unit.

        Each worker has its own cache, so a solution notebook on another worker would train again
        everything its notebook (which it contains) trained; on the same worker it finds it all.
        """

        def _split_scope(self, nodeid: str) -> str:
            return super()._split_scope(nodeid).replace("notebooks/solutions/", "notebooks/")

    def pytest_xdist_make_scheduler(config, log):
        return NotebookWithItsSolutions(config, log)
