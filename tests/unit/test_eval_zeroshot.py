"""Zero-shot scoring: lm-eval encoding, acc/acc_norm by hand, batched == unbatched."""

import math

import pytest
import torch

from conftest import TableLM
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from alsparse.data.tasks import MultipleChoiceItem
from alsparse.eval.zeroshot import encode_pair, score_items, score_requests, score_task

WORDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "q": 3, "aa": 4, "b": 5, "c": 6, "x": 7, "yyyy": 8, "z": 9}
UNIGRAM_P = torch.tensor([0.01, 0.01, 0.01, 0.07, 0.2, 0.3, 0.3, 0.04, 0.03, 0.03])


def word_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(WORDS, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def unigram_model() -> TableLM:
    return TableLM(UNIGRAM_P.log().expand(len(WORDS), -1).clone())


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    corpus = ["Question: how do you boil water? Answer: heat it in a pot until it bubbles.",
              "The cat sat on the mat because it was tired, therefore it slept.",
              "Sarah was a better surgeon than Maria so she got the harder cases."] * 5
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


HAND_ITEMS = [
    # log p: aa -1.609, "b c" -2.408 -> acc picks aa; per char: -0.805 vs -0.803 -> acc_norm picks "b c"
    MultipleChoiceItem.single("q", ["aa", "b c"], gold=1),
    MultipleChoiceItem.single("q", ["b c", "aa", "x"], gold=0),
    MultipleChoiceItem.single("q", ["b", "x"], gold=0),  # both metrics right
]


def test_acc_and_acc_norm_match_hand_computation():
    result = score_task(unigram_model(), word_tokenizer(), HAND_ITEMS, batch_size=2)
    assert result["acc"] == pytest.approx(1 / 3)
    assert result["acc_norm"] == pytest.approx(1.0)
    assert result["n"] == 3 and result["task"] == "custom" and result["metric_of_record"] == "acc"
    assert result["acc_stderr"] == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))


def test_scores_are_sums_of_continuation_logprobs():
    scores = score_items(unigram_model(), word_tokenizer(), HAND_ITEMS[:1], batch_size=1)
    assert scores[0] == pytest.approx([math.log(0.2), 2 * math.log(0.3)], abs=1e-6)


def test_metric_of_record_and_limit():
    result = score_task(unigram_model(), word_tokenizer(), HAND_ITEMS, limit=1, task="piqa")
    assert result["n"] == 1 and result["metric_of_record"] == "acc_norm" and result["value"] == result["acc_norm"] == 1.0


def test_partial_scoring_scores_the_shared_continuation_after_each_context():
    table = torch.randn(len(WORDS), len(WORDS), generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    model = TableLM(table)
    item = MultipleChoiceItem.partial(["q aa", "q b"], "c", gold=1)
    (scores,) = score_items(model, word_tokenizer(), [item], batch_size=1)
    assert scores == pytest.approx([table[4, 6].item(), table[5, 6].item()], abs=1e-6)
    expected_hit = float(table[5, 6] > table[4, 6])
    assert score_task(model, word_tokenizer(), [item])["acc"] == expected_hit


def test_partial_scoring_acc_norm_divides_by_each_context_as_lm_eval_does(monkeypatch):
    # lm-eval's completion_len is len(doc_to_choice(doc)): for WinoGrande the per-choice contexts.
    # Scores -3 and -4 over contexts of 2 and 10 characters: acc picks 0, acc_norm (-1.5 vs -0.4)
    # picks 1; dividing by the shared continuation instead would agree with acc.
    item = MultipleChoiceItem.partial(["q aa", "q b"], "c", gold=1)
    assert item.norm_lengths() == [4, 3]
    wide = MultipleChoiceItem.partial(["ab", "abcdefghij"], "shared", gold=1)
    assert wide.norm_lengths() == [2, 10]
    single = MultipleChoiceItem.single("ctx", ["yes", "maybe"], gold=0)
    assert single.norm_lengths() == [3, 5], "a shared context: the choice texts, as before"

    from alsparse.eval import zeroshot

    monkeypatch.setattr(zeroshot, "score_items", lambda model, tokenizer, items, batch_size=8: [[-3.0, -4.0]])
    result = zeroshot.score_task(None, None, [wide])
    assert (result["acc"], result["acc_norm"]) == (0.0, 1.0)


def test_encode_pair_moves_trailing_context_space_to_the_continuation():
    tokenizer = bpe_tokenizer()
    assert encode_pair(tokenizer, "Answer: ", "heat", []) == encode_pair(tokenizer, "Answer:", " heat", [])
    context, continuation = encode_pair(tokenizer, "Answer:", " heat", [])
    whole = tokenizer("Answer: heat", add_special_tokens=False).input_ids
    assert context + continuation == whole and context == tokenizer("Answer:", add_special_tokens=False).input_ids
    # empty context -> lm-eval's prefix token (BOS, else EOS)
    assert encode_pair(tokenizer, "", "heat", [])[0] == [tokenizer.bos_token_id]


def test_bos_is_prepended_when_the_tokenizer_adds_one():
    model = unigram_model()
    score_items(model, word_tokenizer(add_bos=True), HAND_ITEMS[2:], batch_size=1)
    assert all(inputs[0] == 1 for inputs in model.inputs)
    model = unigram_model()
    score_items(model, word_tokenizer(add_bos=False), HAND_ITEMS[2:], batch_size=1)
    assert all(inputs[0] == 3 for inputs in model.inputs)


def test_batched_scores_equal_unbatched_on_a_tiny_llama():
    tokenizer = bpe_tokenizer()
    model = tiny_llama(len(tokenizer))
    items = [
        MultipleChoiceItem.single("Question: how do you boil water?\nAnswer:", ["heat it in a pot", "cat"], 0),
        MultipleChoiceItem.single("The cat sat on the mat because", ["it was tired.", "therefore it slept on the mat."], 0),
        MultipleChoiceItem.partial(["Sarah was a better surgeon than Maria so Sarah", "Sarah was so Maria"], "got the harder cases.", 1),
        MultipleChoiceItem.single("Answer: ", ["yes", "no", "it bubbles until"], 2),
    ]
    one_at_a_time = score_items(model, tokenizer, items, batch_size=1)
    for batch_size in (3, 8):
        batched = score_items(model, tokenizer, items, batch_size=batch_size)
        for row_batched, row_single in zip(batched, one_at_a_time):
            assert row_batched == pytest.approx(row_single, abs=1e-4)
    # and the definition, computed directly with one full forward
    context, continuation = encode_pair(tokenizer, *items[1].pairs()[1], [])
    inputs = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = model(input_ids=inputs).logits[0, :-1].float().log_softmax(-1)
    direct = sum(logprobs[len(context) - 1 + j, token].item() for j, token in enumerate(continuation))
    assert one_at_a_time[1][1] == pytest.approx(direct, abs=1e-4)


def test_inputs_are_truncated_on_the_left_to_max_length():
    model = unigram_model()
    scores = score_requests(model, [([3, 3, 3, 3, 3], [4, 5])], batch_size=1, max_length=4)
    assert model.inputs == [[3, 3, 3, 4]]
    assert scores[0] == pytest.approx(math.log(0.2) + math.log(0.3), abs=1e-6)
