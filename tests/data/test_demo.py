"""The synthetic demo corpus: deterministic in its seed, MUSDB-shaped, mixtures that are sums and never clip."""

import hashlib

import numpy as np
import soundfile as sf

from data_prep.demo import MUSDB_STEMS, make_demo_corpus


def tree_digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.wav"))}


def test_demo_corpus_is_deterministic_and_well_formed(demo_corpus, tmp_path):
    assert tree_digest(make_demo_corpus(tmp_path / "again", seed=0)) == tree_digest(demo_corpus)

    clips = sorted((demo_corpus / "speech").rglob("*.wav"))
    assert len(clips) == 12
    for clip in clips:
        info = sf.info(clip)
        assert info.samplerate == 16000 and info.channels == 1 and 3.0 <= info.duration <= 8.0

    tracks = {split: sorted((demo_corpus / "musdb" / split).iterdir()) for split in ("train", "test")}
    assert len(tracks["train"]) == 4 and len(tracks["test"]) == 2
    for track in tracks["train"] + tracks["test"]:
        mixture, rate = sf.read(track / "mixture.wav")
        stems = {name: sf.read(track / f"{name}.wav")[0] for name in MUSDB_STEMS}
        assert rate == 16000 and mixture.shape[1] == 2 and 10.0 <= len(mixture) / rate <= 20.0
        assert np.abs(mixture).max() < 1.0
        np.testing.assert_allclose(mixture, sum(stems.values()), atol=3 / 32768)
        assert all(np.sqrt(np.mean(s**2)) > 0.01 for s in stems.values())  # every stem audible
        # the stems have distinct characters: their spectra are far from each other
        spectra = {n: np.abs(np.fft.rfft(s[:16000, 0] * np.hanning(16000))) ** 2 for n, s in stems.items()}
        centroids = {n: (np.arange(len(sp)) * sp).sum() / sp.sum() for n, sp in spectra.items()}
        assert centroids["bass"] < centroids["other"] < centroids["drums"]
