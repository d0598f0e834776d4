"""Task files -> lm-eval prompts; malformed rows name their line."""

import json

import pytest

from alsparse.data import paths
from alsparse.data.tasks import MultipleChoiceItem, load_task, metric_of_record, parse_task_file, task_names


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def pairs(item):
    return item.pairs()


def test_piqa_prompt(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"query": "Question: How to boil water?\n", "choices": ["Heat it.", "Cool it."], "gold": 0}])
    (item,) = parse_task_file("piqa", path)
    assert pairs(item) == [("Question: How to boil water?\nAnswer:", " Heat it."),
                           ("Question: How to boil water?\nAnswer:", " Cool it.")]
    assert item.gold == 0 and item.norm_lengths() == [8, 8]


def test_arc_prompt(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"query": "Question: What is 2+2?", "choices": ["3", "4", "5", "22"], "gold": 1}])
    (item,) = parse_task_file("arc_easy", path)
    assert pairs(item)[1] == ("Question: What is 2+2?\nAnswer:", " 4")
    assert item.n_choices == 4


def test_boolq_prompt(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [{"query": "Passage: Water is wet.\nQuestion: is water wet?", "choices": ["no", "yes"], "gold": 1}])
    (item,) = parse_task_file("boolq", path)
    assert pairs(item) == [("Water is wet.\nQuestion: is water wet?\nAnswer:", " no"),
                           ("Water is wet.\nQuestion: is water wet?\nAnswer:", " yes")]


def test_copa_prompt_uses_lm_eval_connector_and_lowercase_choice(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"query": "The man turned on the faucet, therefore", "choices": ["The toilet filled.", "water flowed."], "gold": 1}])
    (item,) = parse_task_file("copa", path)
    assert pairs(item) == [("The man turned on the faucet therefore", " the toilet filled."),
                           ("The man turned on the faucet therefore", " water flowed.")]


def test_openbookqa_prompt(tmp_path):
    path = write_jsonl(tmp_path / "o.jsonl", [{"query": "Fog is most likely around", "choices": ["a marsh", "a desert"], "gold": 0}])
    (item,) = parse_task_file("openbookqa", path)
    assert pairs(item)[0] == ("Fog is most likely around", " a marsh")


def test_winogrande_partial_scoring(tmp_path):
    path = write_jsonl(tmp_path / "w.jsonl", [{"context_options": ["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"], "continuation": "was sad.", "gold": 1}])
    (item,) = parse_task_file("winogrande", path)
    assert pairs(item) == [("Sarah beat Maria so Sarah", " was sad."), ("Sarah beat Maria so Maria", " was sad.")]
    assert item.n_choices == 2 and item.gold == 1


def test_hellaswag_preprocessing(tmp_path):
    row = {"activity_label": "Baking cookies", "ctx_a": "A woman mixes dough.", "ctx_b": "she",
           "endings": ["puts it in  the oven. [step] Wait.", "[header] Eat them [title] now"], "label": 0}
    path = write_jsonl(tmp_path / "h.jsonl", [row])
    (item,) = parse_task_file("hellaswag", path)
    assert item.contexts == ("Baking cookies: A woman mixes dough. She",)
    # lm-eval strips before removing brackets, so a leading "[header]" leaves a leading space
    assert item.continuations == ("puts it in the oven. Wait.", " Eat them. now")


def test_rte_prompt_label_zero_is_true(tmp_path):
    path = tmp_path / "rte.tsv"
    path.write_text('sentence1\tsentence2\tlabel\tidx\nA "quoted" cat sat.\tA cat sat.\t0\t0\n', encoding="utf-8")
    (item,) = parse_task_file("rte", path)
    assert pairs(item) == [('A "quoted" cat sat.\nQuestion: A cat sat. True or False?\nAnswer:', " True"),
                           ('A "quoted" cat sat.\nQuestion: A cat sat. True or False?\nAnswer:', " False")]
    assert item.gold == 0


@pytest.mark.parametrize("task, bad_row, match", [
    ("piqa", {"query": "Question: x\n", "choices": ["a", "b"], "gold": 2}, "gold"),
    ("piqa", {"query": "How?\n", "choices": ["a", "b"], "gold": 0}, "Question: "),
    ("arc_easy", {"query": "Question: x", "gold": 0}, "missing field 'choices'"),
    ("copa", {"query": "It rained so", "choices": ["a", "b"], "gold": 0}, "because"),
    ("winogrande", {"context_options": ["a"], "continuation": "b", "gold": 0}, "two strings"),
])
def test_malformed_row_names_file_and_line(tmp_path, task, bad_row, match):
    good = {"piqa": {"query": "Question: x\n", "choices": ["a", "b"], "gold": 0},
            "arc_easy": {"query": "Question: x", "choices": ["a", "b"], "gold": 0},
            "copa": {"query": "It rained, because", "choices": ["a", "b"], "gold": 0},
            "winogrande": {"context_options": ["a", "b"], "continuation": "c", "gold": 0}}[task]
    path = write_jsonl(tmp_path / "t.jsonl", [good, good, bad_row, good])
    with pytest.raises(ValueError, match=rf"t\.jsonl:3: malformed {task} row: .*{match}"):
        parse_task_file(task, path)


def test_invalid_json_and_bad_tsv_name_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"query": "Question: x\\n", "choices": ["a", "b"], "gold": 0}\n{"query": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"t\.jsonl:2: invalid JSON"):
        parse_task_file("piqa", path)
    tsv = tmp_path / "rte.tsv"
    tsv.write_text("sentence1\tsentence2\tlabel\tidx\na\tb\t0\t0\na\tb\t7\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"rte\.tsv:3: malformed rte row: 'label' '7'"):
        parse_task_file("rte", tsv)


def test_unknown_task_lists_known_tasks():
    with pytest.raises(ValueError, match="arc_challenge, arc_easy, boolq, copa, hellaswag"):
        parse_task_file("lambada", "x.jsonl")


def test_registry_and_metrics_of_record():
    assert task_names() == ["arc_challenge", "arc_easy", "boolq", "copa", "hellaswag", "openbookqa", "piqa", "rte", "winogrande"]
    assert {t for t in task_names() if metric_of_record(t) == "acc_norm"} == {"hellaswag", "piqa", "openbookqa", "arc_easy", "arc_challenge"}


def test_load_task_reads_from_the_data_dir_with_limit(tmp_path, monkeypatch):
    (tmp_path / "tasks").mkdir()
    write_jsonl(tmp_path / "tasks" / "openbookqa.jsonl",
                [{"query": f"q{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(5)])
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path))
    assert len(load_task("openbookqa")) == 5
    assert [item.gold for item in load_task("openbookqa", limit=3)] == [0, 1, 0]


@pytest.mark.parametrize("contexts, continuations, gold", [
    (("a",), ("b",), 0),            # one choice
    (("a", "b"), ("c", "d"), 0),    # neither shared
    (("a",), ("b", "c"), 2),        # gold out of range
    (("a",), ("b", ""), 0),         # empty continuation
])
def test_item_validation(contexts, continuations, gold):
    with pytest.raises(ValueError):
        MultipleChoiceItem(contexts, continuations, gold)
