"""Calibration windows: seeded, inside the text, BOS-aware; fingerprints."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from alsparse.data.calibration import fingerprint, needs_bos, sample_calibration, sample_windows

WORDS = [f"w{i}" for i in range(50)]


def word_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


TEXT = " ".join(WORDS)  # token ids 4..53, in order


def test_needs_bos_follows_the_tokenizer():
    assert needs_bos(word_tokenizer(add_bos=True))
    assert not needs_bos(word_tokenizer(add_bos=False))


def test_sampling_is_deterministic_per_seed_and_differs_across_seeds():
    tokenizer = word_tokenizer(add_bos=False)
    first = sample_calibration(tokenizer, TEXT, nsamples=8, seqlen=5, seed=0)
    again = sample_calibration(tokenizer, TEXT, nsamples=8, seqlen=5, seed=0)
    other = sample_calibration(tokenizer, TEXT, nsamples=8, seqlen=5, seed=1)
    assert first.shape == (8, 5) and first.dtype == torch.long
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_windows_are_contiguous_slices_of_the_text():
    windows = sample_calibration(word_tokenizer(add_bos=False), TEXT, nsamples=32, seqlen=7, seed=3)
    assert windows.min() >= 4 and windows.max() <= 53
    # ids are consecutive in the text, so every window is a run of +1 steps
    assert torch.all(windows[:, 1:] - windows[:, :-1] == 1)


def test_exact_sampling_rule():
    ids = torch.arange(100, 120)
    generator = torch.Generator().manual_seed(5)
    starts = torch.randint(0, 20 - 4 + 1, (3,), generator=generator)
    expected = torch.stack([ids[s:s + 4] for s in starts.tolist()])
    assert torch.equal(sample_windows(ids, 3, 4, seed=5), expected)


def test_bos_windows_take_seqlen_minus_one_text_tokens():
    windows = sample_calibration(word_tokenizer(add_bos=True), TEXT, nsamples=4, seqlen=6, seed=0)
    assert windows.shape == (4, 6)
    assert torch.all(windows[:, 0] == 1)
    assert torch.all(windows[:, 1:] >= 4)  # the text itself was encoded without special tokens


def test_text_shorter_than_one_window_is_a_clear_error():
    with pytest.raises(ValueError, match=r"has 50 tokens.*seqlen=64 needs 64 text tokens"):
        sample_calibration(word_tokenizer(add_bos=False), TEXT, nsamples=2, seqlen=64, seed=0)
    with pytest.raises(ValueError, match=r"has 50 tokens.*needs 51 text tokens after the BOS"):
        sample_calibration(word_tokenizer(add_bos=True), TEXT, nsamples=2, seqlen=52, seed=0)
    # exactly one window fits
    assert sample_calibration(word_tokenizer(add_bos=False), TEXT, nsamples=2, seqlen=50, seed=0).shape == (2, 50)


def test_fingerprint_is_stable_and_content_sensitive():
    ids = torch.arange(12).view(3, 4)
    assert fingerprint(ids) == fingerprint(ids.clone().to(torch.int32))
    assert fingerprint(ids) == "700a4498438a801b"  # sha256 of int64 bytes 0..11, first 16 hex digits
    assert len(fingerprint(ids)) == 16
    changed = ids.clone()
    changed[2, 3] = 99
    assert fingerprint(changed) != fingerprint(ids)
