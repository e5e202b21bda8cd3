"""Shared test setup: offline hub, paths to the real data and model, tiny HF checkpoints."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test extra installs libtpu (dry-run tests compile for TPU topologies): keep JAX on the
# CPU here, as `dtm.cli` does for jobs on hosts without a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Jobs run by the tests (in-process and as subprocesses) keep their persistent compilation
# cache in a directory of this test process, not the user's ~/.cache/dtm/jax.
import tempfile  # noqa: E402

os.environ.setdefault("DTM_JAX_CACHE", tempfile.mkdtemp(prefix="dtm-test-jax-"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WIKITEXT_RAW = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"


# The longest files first (measured 2026-12-02). A serial run follows this order. Under
# `-n 2 --dist loadfile` (one file per worker at a time, so module fixtures are built once)
# pytest-xdist 3.8 first sorts the files by their number of tests (--loadscope-reorder, its
# default) and keeps this order only among files with as many tests.
HEAVY_FIRST = ("test_isolated.py", "test_train_job.py", "test_prune_job.py",
               "test_reference_pipelines.py",
               "test_probe.py", "test_evaluate.py", "test_lm_eval.py", "test_train_recovery.py",
               "test_prune_compare.py", "test_quantize_job.py", "test_compare_job.py")


# Test files that a full run executes in a fresh interpreter (`tests/test_isolated.py`), not
# in a worker after other files. Twice in four full runs (2026-12-07: CI, then here) greedy
# generation of SmolLM2 in one worker, late in the run, returned token 0 at every position
# (non-finite logits) while the teacher-forced pass on the same params still matched torch:
# the evaluate module's references and test_train_recovery's. Each file alone, the same file
# after the suspects in one process, and a run with a fresh-compile canary after every module
# all passed. A fifth run (under heavy load beside other jobs) showed it inside the fresh
# interpreter too (some rows all zeros, the same rows for every model in that process), so
# isolation does not prevent it; the cause is not found (README "Tests"). Generation now
# marks non-finite rows and the references refuse them (`evaluation.check_finite_tokens`),
# so a recurrence is a named error, not metrics against zeros.
ISOLATED = ("test_evaluate.py", "test_train_recovery.py")


def pytest_ignore_collect(collection_path, config):
  """Leave ISOLATED files to test_isolated.py, unless named on the command line (pytest
  does not ask this hook about those) or run by it (DTM_TEST_ISOLATED=1)."""
  if collection_path.name in ISOLATED and os.environ.get("DTM_TEST_ISOLATED") != "1":
    return True
  return None


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


def torch_or_skip():
  """Import torch + transformers' Llama, or skip with a visible reason."""
  return pytest.importorskip(
      "torch", reason="oracle tests need the CPU torch wheel: pip install torch==2.13.0")


@pytest.fixture(scope="session")
def wikitext_path() -> str:
  if not WIKITEXT_RAW.exists():
    pytest.fail(f"WikiText-2 raw test split not found at {WIKITEXT_RAW} (shared/ beside the repo)")
  return str(WIKITEXT_RAW)


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
  from dtm import gguf_io
  return gguf_io.find_smollm2_gguf()


_SMOLLM2_PRINT: list[str] = []  # the session model's params fingerprint when loaded


@pytest.fixture(scope="session")
def smollm2():
  """The embedded default model, loaded once per test session (float32)."""
  from dtm import io_utils
  from dtm.loading import load_model
  model = load_model("smollm2-135m")
  _SMOLLM2_PRINT.append(io_utils.params_fingerprint(model.params))
  return model


@pytest.fixture(autouse=True)
def _smollm2_unchanged(request):
  """Many tests share the session's SmolLM2: one that changes (or frees) its params fails
  here, by name, instead of a later test on a broken model (seen once in a full run:
  DPPL 62,575 before any compression in test_train_recovery)."""
  yield
  if "smollm2" not in request.fixturenames or not _SMOLLM2_PRINT:
    return
  from dtm import io_utils
  try:
    now = io_utils.params_fingerprint(request.getfixturevalue("smollm2").params)
  except RuntimeError as e:  # a deleted (donated) buffer
    pytest.fail(f"{request.node.nodeid} freed the session's SmolLM2 params: {e}")
  if now != _SMOLLM2_PRINT[0]:
    _SMOLLM2_PRINT.insert(0, now)  # name the culprit once, not every test after it
    pytest.fail(f"the session's SmolLM2 params changed by the end of {request.node.nodeid} "
                f"(fingerprint {_SMOLLM2_PRINT[1]} -> {now}): this test, or one run since the "
                "last test that used the model on this worker")
