import pytest


@pytest.fixture(autouse=True)
def _private_trace_cache(tmp_path, monkeypatch):
    """Planner runs in tests keep their traces in the test's own directory, never in ~/.cache."""
    monkeypatch.setenv("DIST_AUDIO_PLAN_CACHE", str(tmp_path / "plan-cache"))
