"""Shared test setup: offline hub, paths to the real data and model, tiny HF checkpoints."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WIKITEXT_RAW = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"


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


@pytest.fixture(scope="session")
def smollm2():
  """The embedded default model, loaded once per test session (float32)."""
  from dtm.loading import load_model
  return load_model("smollm2-135m")
