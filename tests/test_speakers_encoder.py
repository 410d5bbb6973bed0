"""The speaker encoder in numpy (speakers/encoder.py, weights converted without torch by
speakers/weights.py) against resemblyzer 0.1.4's own torch model and librosa features, on recorded
speech of three people (testkit/real_voices.py): equal within 1e-4."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from testkit.real_voices import clips
from whisper_triton.speakers.encoder import VoiceEncoder, level_gain, mel_spectrogram
from whisper_triton.speakers.weights import SOURCE_SHA256, convert, read_legacy_state, resemblyzer_weights_path

torch = pytest.importorskip("torch")
resemblyzer = pytest.importorskip("resemblyzer")  # installed --no-deps by scripts/install.sh --test (the oracle)

VOICES = ("en", "librivox", "it-menardi")  # 16 kHz G.722, 16 kHz WAV, 8 kHz GSM


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert(target=tmp_path_factory.mktemp("encoder") / "voice_encoder.npz")


@pytest.fixture(scope="module")
def ours(converted) -> VoiceEncoder:
    return VoiceEncoder.load(converted)


@pytest.fixture(scope="module")
def theirs():
    return resemblyzer.VoiceEncoder("cpu", verbose=False)


@pytest.fixture(scope="module")
def speech() -> dict[str, np.ndarray]:
    """A few seconds of each voice at resemblyzer's level (its `normalize_volume`, increase only)."""
    from resemblyzer.audio import normalize_volume

    return {voice: normalize_volume(np.concatenate(clips(voice)[:2]) * 0.05, -30, increase_only=True)
            for voice in VOICES}


def test_converted_weights_are_the_wheels_state_dict(converted, theirs):
    with np.load(converted) as data:
        assert str(data["source_sha256"]) == SOURCE_SHA256
        for name, tensor in theirs.state_dict().items():
            assert np.array_equal(data[name.replace(".", "/")], tensor.numpy()), name


@pytest.mark.parametrize("voice", VOICES)
def test_mel_spectrogram_equals_resemblyzers(speech, voice):
    from resemblyzer.audio import wav_to_mel_spectrogram

    expected = wav_to_mel_spectrogram(speech[voice])
    found = mel_spectrogram(speech[voice])
    assert found.shape == expected.shape
    np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("voice", VOICES)
def test_embeddings_equal_resemblyzers_torch_output(ours, theirs, speech, voice):
    from resemblyzer.audio import wav_to_mel_spectrogram

    mel = wav_to_mel_spectrogram(speech[voice])
    partials = np.stack([mel[i : i + 160] for i in range(0, mel.shape[0] - 160, 60)])
    with torch.no_grad():
        expected = theirs(torch.from_numpy(partials)).numpy()
    assert np.abs(ours.embed(partials) - expected).max() < 1e-4
    assert np.abs(ours.embed_utterance(speech[voice]) - theirs.embed_utterance(speech[voice])).max() < 1e-4


def test_different_people_are_further_apart_than_one_person(ours):
    """Not a property of the port but of the weights: the check that they encode voices at all."""
    def embedding(voice, first):
        audio = np.concatenate(clips(voice)[first : first + 3])
        return ours.embed_utterance(audio * level_gain(audio))

    same = embedding("en", 0) @ embedding("en", 10)
    different = embedding("en", 0) @ embedding("it", 0)
    assert same > different + 0.1


def test_a_file_that_is_not_a_torch_state_dict_is_refused(tmp_path):
    """The restricted unpickler runs no code: a pickle naming any other class is refused."""
    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        for header in (0x1950A86A20F9469CFC6C, 1001, {}):
            pickle.dump(header, handle, protocol=2)
        pickle.dump({"model_state": __import__("os").getcwd}, handle, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        read_legacy_state(path)


def test_conversion_refuses_other_weights(tmp_path):
    other = tmp_path / "pretrained.pt"
    other.write_bytes(resemblyzer_weights_path().read_bytes()[:-1] + b"\0")
    with pytest.raises(RuntimeError, match="sha256"):
        convert(other, tmp_path / "out.npz")
