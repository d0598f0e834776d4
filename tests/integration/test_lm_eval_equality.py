"""alsparse's zero-shot and word perplexity against lm-eval itself, on the real SmolLM2 and the
local data: lm-eval runs its official task definitions (only the data source is local,
alsparse.eval.lm_eval_tasks), item by item. One differing prompt, log-likelihood or chosen
answer fails the test."""

from __future__ import annotations

import pytest
import torch

from alsparse.data import load_task
from alsparse.data.text import documents, wikitext_detokenize
from alsparse.eval import score_items, word_perplexity
from alsparse.eval.lm_eval_tasks import LOCAL_TASKS

pytestmark = pytest.mark.integration
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the test extra: pip install -e '.[test]'")

TASKS = [t for t in LOCAL_TASKS if t != "wikitext"]
ITEMS = 20  # per task
DOCUMENTS = 2  # WikiText-2 test documents, rolling windows of MAX_LENGTH
MAX_LENGTH = 1024


@pytest.fixture(scope="module")
def smollm2(real_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(real_model_dir)


@pytest.fixture(scope="module")
def harness(smollm2):
    from alsparse.eval.lm_eval_adapter import evaluate_with_lm_eval

    model, tokenizer = smollm2
    zero_shot = evaluate_with_lm_eval(model, tokenizer, TASKS, limit=ITEMS, max_length=MAX_LENGTH, log_samples=True)
    wikitext = evaluate_with_lm_eval(model, tokenizer, ["wikitext"], limit=DOCUMENTS, max_length=MAX_LENGTH)
    return zero_shot, wikitext


def _argmax(values):
    return max(range(len(values)), key=lambda i: values[i])


@pytest.mark.parametrize("task", TASKS)
def test_every_item_scores_and_answers_as_in_lm_eval(smollm2, harness, task):
    model, tokenizer = smollm2
    samples, lm_task = harness[0]["samples"][task], harness[0]["task_objects"][task]
    items = load_task(task, limit=ITEMS)
    ours = score_items(model, tokenizer, items, batch_size=8)
    assert [s["doc_id"] for s in samples] == list(range(ITEMS))
    for sample, item, scores in zip(samples, items, ours):
        where = f"{task} item {sample['doc_id']}"
        # the same prompts: lm-eval's (context, continuation) per choice are alsparse's
        assert [tuple(args) for args in sample["arguments"]] == item.pairs(), where
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        assert theirs == pytest.approx(scores, abs=1e-4), where
        # partial scoring (WinoGrande): doc_to_text gives the gold index, the target is the shared rest
        gold = lm_task.doc_to_text(sample["doc"]) if lm_task.multiple_input else int(sample["target"])
        assert gold == item.gold, where
        assert _argmax(theirs) == _argmax(scores) and float(sample["acc"]) == float(_argmax(scores) == item.gold), where
        if "acc_norm" in sample:  # lm-eval divides by the characters of each doc_to_choice string
            lengths = [len(c) for c in lm_task.doc_to_choice(sample["doc"])]
            assert lengths == item.norm_lengths(), where
            mine = _argmax([s / n for s, n in zip(scores, item.norm_lengths())])
            assert _argmax([s / n for s, n in zip(theirs, lengths)]) == mine, where
            assert float(sample["acc_norm"]) == float(mine == item.gold), where


RENDERED = 500  # rows per task whose prompts are compared without a model (all of a task's transformations)


def test_lm_evals_official_templates_rebuild_alsparses_prompts(tmp_path):
    """For the first RENDERED rows of every task, the requests lm-eval builds from its own YAML over
    the converted documents are alsparse's (context, continuation) pairs, and its gold is ours."""
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager, get_task_dict

    from alsparse.eval.lm_eval_tasks import write_tasks

    names = write_tasks(tmp_path, TASKS)
    tasks = get_task_dict(list(names.values()), TaskManager(include_path=str(tmp_path), include_defaults=False))
    for task in TASKS:
        lm_task = tasks[names[task]]
        docs, items = list(lm_task.eval_docs), load_task(task)
        assert len(docs) == len(items), task
        for i, (doc, item) in enumerate(zip(docs[:RENDERED], items)):
            requests = lm_task.construct_requests(doc, lm_task.fewshot_context(doc, 0), metadata=(task, i, 1))
            assert [tuple(r.arguments) for r in requests] == item.pairs(), f"{task} row {i}"
            gold = lm_task.doc_to_text(doc) if lm_task.multiple_input else lm_task.doc_to_target(doc)
            assert gold == item.gold, f"{task} row {i}"


def test_word_perplexity_equals_lm_evals_wikitext(smollm2, harness):
    model, tokenizer = smollm2
    theirs = harness[1]["results"]["wikitext"]
    ours = word_perplexity(model, tokenizer, documents("wikitext2", "test")[:DOCUMENTS], MAX_LENGTH,
                           detokenize=wikitext_detokenize)
    assert ours["documents"] == theirs["sample_len"] == DOCUMENTS
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours[metric] == pytest.approx(theirs[f"{metric},none"], rel=1e-3), metric


def test_the_harness_table_names_every_task(harness):
    table = harness[0]["table"]
    for task in TASKS:
        assert f"alsparse_{task}" in table
