"""The soak (``bench/soak.py``) for a couple of minutes, with enough steps that even an idle machine sees
several kills: random SIGKILLs of either DDP rank, automatic ``--resume auto``, and at the end the step
count, AdamW's own counter and the per-step losses prove that no step was lost or applied twice. The
30-minute run is recorded in bench/results/soak.md."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import soak


@pytest.mark.slow
def test_short_soak_survives_random_kills(tmp_path, speech_shards):
    figures = soak.main(["--minutes", "2", "--kill-every", "15", "30", "--steps", "400", "--checkpoint-every", "10",
                         "--shards", str(speech_shards), "--workdir", str(tmp_path), "--seed", "1"])
    assert figures["kills"] >= 2 and figures["final_step"] == 400 and figures["adam_step"] == 400
