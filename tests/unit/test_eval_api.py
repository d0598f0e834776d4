"""EvalConfig validation, evaluate() end to end on a tiny model and fake data, format_results."""

import json
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from alsparse.data import paths
from alsparse.eval import EvalConfig, evaluate, format_results

VOCAB = ["<unk>", "<s>", "</s>", "=", "Alpha", "is", "a", "test", ".", "Question:", "x", "Answer:", "yes", "no"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


class UniformLM(torch.nn.Module):
    def __init__(self, vocab_size: int, max_positions: int = 16):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=max_positions)
        self.vocab_size = vocab_size

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size))


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    (tmp_path / "wikitext2").mkdir()
    lines = [" ", " = Alpha = ", " "] + [" Alpha is a test . Alpha is a test . "] * 20 + [" "]
    (tmp_path / "wikitext2" / "test.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "tasks").mkdir()
    rows = [{"query": "Question: x\n", "choices": ["yes", "no"], "gold": i % 2} for i in range(6)]
    (tmp_path / "tasks" / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path))
    return tmp_path


def test_config_validation_lists_choices():
    with pytest.raises(ValueError, match="unknown perplexity corpus 'c4'; choose one of: ptb, wikitext2"):
        EvalConfig(ppl=("c4",))
    with pytest.raises(ValueError, match="unknown task 'lambada'; choose one of: arc_challenge"):
        EvalConfig(tasks=("lambada",))
    for bad in ({"seq_len": 0}, {"limit": -1}, {"batch_size": 0}, {"task_limit": 1.5}):
        with pytest.raises(ValueError):
            EvalConfig(**bad)


def test_config_normalises_sequences():
    cfg = EvalConfig(ppl="wikitext2", tasks=["piqa", "boolq"])
    assert cfg.ppl == ("wikitext2",) and cfg.tasks == ("piqa", "boolq")
    hash(cfg)  # frozen and hashable


def test_text_file_paths_are_accepted(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("some text")
    assert EvalConfig(ppl=(str(path),)).ppl == (str(path),)


def test_evaluate_end_to_end(data_root):
    tokenizer = word_tokenizer()
    model = UniformLM(len(VOCAB), max_positions=16)
    results = evaluate(model, tokenizer, EvalConfig(ppl=("wikitext2",), tasks=("piqa",), limit=3, word_ppl=True))
    token = results["token_ppl"]["wikitext2"]
    assert results["seq_len"] == 16  # min(model context, 2048)
    assert token["protocol"] == "token-ppl" and token["split"] == "test" and token["windows"] == 3
    assert token["ppl"] == pytest.approx(len(VOCAB), rel=1e-6)
    word = results["word_ppl"]["wikitext2"]
    assert word["protocol"] == "word-ppl" and word["max_length"] == 16 and word["documents"] == 1
    piqa = results["tasks"]["piqa"]
    assert piqa["n"] == 6 and piqa["metric_of_record"] == "acc_norm"
    assert piqa["acc"] == 0.5  # uniform model: ties -> first choice, gold alternates
    assert results["tasks_mean"] == {"value": piqa["acc_norm"], "metrics": {"piqa": "acc_norm"}}

    text = format_results(results)
    assert "token-ppl" in text and "word-ppl" in text and "acc_norm" in text
    token_table, word_table, task_table = text.split("\n\n")
    assert "word_ppl" not in token_table and "ppl" not in task_table.split("\n")[0].replace("token-ppl", "")
    assert f"{len(VOCAB):.4f}" in token_table and "16" in token_table  # seq_len always printed
    assert "mean" in task_table


def test_seq_len_beyond_model_context_is_rejected(data_root):
    with pytest.raises(ValueError, match="seq_len=32 exceeds the model's context of 16"):
        evaluate(UniformLM(len(VOCAB), 16), word_tokenizer(), EvalConfig(seq_len=32))


def test_format_results_without_tasks_prints_only_ppl():
    results = {"token_ppl": {"ptb": {"corpus": "ptb", "split": "validation", "seq_len": 8, "windows": 2,
                                     "tokens": 14, "bos": False, "ppl": 12.5}}, "word_ppl": {}, "tasks": {}}
    text = format_results(results)
    assert text.startswith("token-ppl") and "12.5000" in text and "zero-shot" not in text


def test_lm_eval_adapter_without_the_package_is_a_clear_error(monkeypatch):
    import builtins

    from alsparse.eval import lm_eval_adapter

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("no lm_eval")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert not lm_eval_adapter.lm_eval_available()
    with pytest.raises(ImportError, match=r"pip install 'alsparse\[eval\]'"):
        lm_eval_adapter.evaluate_with_lm_eval(object(), object(), ["piqa"])


def test_winogrande_conversion_gives_lm_evals_functions_the_contexts_back():
    """Options that share their first letters (Sam / Sarah) still rebuild both contexts exactly."""
    from alsparse.eval.lm_eval_tasks import _winogrande

    row = {"context_options": ["Sam helped Sarah because Sam", "Sam helped Sarah because Sarah"],
           "continuation": " was kind. ", "gold": 1}
    doc = _winogrande(row)
    blank = doc["sentence"].index("_")
    assert [doc["sentence"][:blank] + doc[o] for o in ("option1", "option2")] == row["context_options"]
    assert doc["sentence"][blank + 1:].strip() == "was kind." and doc["answer"] == "2"


def test_local_lm_eval_tasks_include_the_official_yaml(tmp_path):
    pytest.importorskip("lm_eval")
    import json

    from alsparse.eval.lm_eval_tasks import lm_eval_tasks_dir, write_tasks

    assert write_tasks(tmp_path, ["rte"]) == {"rte": "alsparse_rte"}
    config = json.loads((tmp_path / "rte.yaml").read_text())
    assert config["include"] == str(lm_eval_tasks_dir() / "glue" / "rte" / "default.yaml")
    assert config["dataset_kwargs"]["data_files"]["validation"] == str(tmp_path / "rte.jsonl")
    first = json.loads((tmp_path / "rte.jsonl").read_text().splitlines()[0])
    assert set(first) == {"sentence1", "sentence2", "label", "idx"} and isinstance(first["label"], int)
    with pytest.raises(ValueError, match="no local lm-eval definition for copa; available: piqa"):
        write_tasks(tmp_path, ["copa"])
