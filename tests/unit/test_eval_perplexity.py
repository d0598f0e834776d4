"""token-ppl and word-ppl pinned on hand-checkable models."""

import math
import re
from types import SimpleNamespace

import pytest
import torch

from conftest import TableLM
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from alsparse.eval.perplexity import (
    count_words,
    perplexity_windows,
    rolling_windows,
    token_perplexity,
    word_perplexity,
)


class UniformLM(torch.nn.Module):
    """Zero logits everywhere: every token has probability 1 / vocab_size."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size))


def BigramLM(logprobs: torch.Tensor) -> TableLM:
    """logits[t] = log P(. | input_ids[t]) from a fixed table; must be called with use_cache=False."""
    return TableLM(logprobs, strict_cache=True)


def bigram(vocab_size: int, seed: int = 0) -> TableLM:
    generator = torch.Generator().manual_seed(seed)
    return BigramLM(torch.randn(vocab_size, vocab_size, generator=generator).log_softmax(-1))


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "c": 5, "d": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_uniform_logits_score_exactly_vocab_size():
    ids = torch.randint(0, 97, (1, 1000), generator=torch.Generator().manual_seed(0))
    for batch_size in (1, 3):
        result = token_perplexity(UniformLM(97), ids, seq_len=64, batch_size=batch_size)
        assert result["ppl"] == pytest.approx(97, rel=1e-6)
        assert result["protocol"] == "token-ppl"
        assert result["windows"] == 1000 // 64 and result["tokens"] == 15 * 63 and result["seq_len"] == 64


def test_token_ppl_matches_hand_computation_on_bigram():
    model = bigram(8)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0, 1, 2]])
    result = token_perplexity(model, ids, seq_len=4)
    # windows [1,2,3,4] and [5,6,7,0]; the tail [1,2] is dropped; position 0 of a window is not predicted
    predicted_pairs = [(1, 2), (2, 3), (3, 4), (5, 6), (6, 7), (7, 0)]
    nll = -sum(model.table[a, b].item() for a, b in predicted_pairs) / 6
    assert result["nll"] == pytest.approx(nll, rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(nll), rel=1e-6)
    assert model.inputs == [[1, 2, 3, 4], [5, 6, 7, 0]]
    assert token_perplexity(model, ids, seq_len=4, limit=1)["windows"] == 1


def test_bos_windows_prepend_bos_to_seq_len_minus_one_tokens():
    windows = perplexity_windows(torch.arange(10, 17), seq_len=3, bos_token_id=1)
    assert windows.tolist() == [[1, 10, 11], [1, 12, 13], [1, 14, 15]]
    model = bigram(20)
    result = token_perplexity(model, torch.arange(10, 17).view(1, -1), seq_len=3, bos_token_id=1)
    pairs = [(1, 10), (10, 11), (1, 12), (12, 13), (1, 14), (14, 15)]
    assert result["nll"] == pytest.approx(-sum(model.table[a, b].item() for a, b in pairs) / 6, rel=1e-6)
    assert result["bos"] is True


def test_text_shorter_than_a_window_is_an_error():
    with pytest.raises(ValueError, match="3 tokens, fewer than one window of seq_len=8"):
        token_perplexity(UniformLM(5), torch.tensor([[1, 2, 3]]), seq_len=8)


def test_rolling_windows_reproduce_lm_eval():
    assert rolling_windows([10, 11, 12, 13, 14], prefix_token_id=1, max_length=2) == [
        ([1], [10, 11]),        # first window: [prefix] + tokens[:1] predicts tokens[:2]
        ([11], [12, 13]),       # one token of context
        ([12, 13], [14]),       # the last window keeps max_length inputs, predicts only the new token
    ]
    assert rolling_windows([10, 11, 12], 1, max_length=8) == [([1], [10, 11, 12])]
    assert rolling_windows([], 1, max_length=8) == []


@pytest.mark.parametrize("n_tokens, max_length", [(1, 4), (9, 4), (12, 4), (13, 5), (40, 7)])
def test_rolling_windows_predict_every_token_once(n_tokens, max_length):
    tokens = list(range(100, 100 + n_tokens))
    windows = rolling_windows(tokens, 1, max_length)
    assert [t for _, continuation in windows for t in continuation] == tokens
    for context, continuation in windows:
        assert len(context) >= 1 and len(context) + len(continuation) - 1 <= max_length


@pytest.mark.parametrize("max_length", [2, 3, 100])
def test_word_ppl_matches_hand_computation(max_length):
    model = bigram(7, seed=1)
    docs = ["a b c a", " d d\n"]
    result = word_perplexity(model, word_tokenizer(), docs, max_length=max_length)
    lp = model.table
    # every token predicted once from the token before it; the first from the prefix (BOS = 1)
    nll = -(lp[1, 3] + lp[3, 4] + lp[4, 5] + lp[5, 3] + lp[1, 6] + lp[6, 6]).item()
    words = 4 + 4  # lm-eval counts re.split(r"\s+"): " d d\n" -> ['', 'd', 'd', '']
    n_bytes = 7 + 5
    assert result["protocol"] == "word-ppl"
    assert result["nll"] == pytest.approx(nll, rel=1e-6)
    assert result["words"] == words and result["bytes"] == n_bytes and result["documents"] == 2
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-6)
    assert result["byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-6)
    assert all(len(inputs) <= max_length for inputs in model.inputs)


def test_word_ppl_scores_the_detokenised_text_but_counts_the_original():
    model = bigram(7, seed=2)
    result = word_perplexity(model, word_tokenizer(), ["a @-@ b"], max_length=8,
                             detokenize=lambda s: s.replace(" @-@ ", " "), limit=1)
    assert model.inputs == [[1, 3]]  # "a b" scored
    assert result["words"] == 3 and result["bytes"] == 7
    assert result["nll"] == pytest.approx(-(model.table[1, 3] + model.table[3, 4]).item(), rel=1e-6)


def test_count_words_is_lm_eval_regex_split():
    text = " = Title = \n \n Body text . \n"
    assert count_words(text) == len(re.split(r"\s+", text)) == 8  # 6 words + edge whitespace twice


def test_tokenizer_and_text_form_equals_ids_form():
    tokenizer = word_tokenizer()
    model = bigram(7)
    text = "a b c d " * 10
    from_text = token_perplexity(model, tokenizer, 8, text=text)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    assert from_text["nll"] == token_perplexity(model, ids, 8)["nll"]
    with pytest.raises(ValueError, match="text"):
        token_perplexity(model, tokenizer, 8)


def test_perplexity_progress_goes_to_stderr_when_not_a_terminal(capsys):
    """`alsparse eval` was silent for minutes: the bars were disabled off a TTY (tqdm disable=None)."""
    ids = torch.randint(0, 97, (1, 400), generator=torch.Generator().manual_seed(0))
    token_perplexity(UniformLM(97), ids, seq_len=64)
    captured = capsys.readouterr()
    assert "token-ppl" in captured.err and "6/6" in captured.err and captured.out == ""
