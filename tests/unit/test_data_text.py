"""Data directory lookup, WikiText detokeniser, corpus strings and lm-eval documents."""

from pathlib import Path

import pytest

from alsparse.data import paths
from alsparse.data.text import documents, load_corpus, split_wikitext_documents, wikitext_detokenize


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """A fake data directory holding tiny WikiText-2 and PTB files, selected via ALSPARSE_DATA."""
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "test.txt").write_text(
        " \n = Alpha = \n \n Alpha is a 3 @-@ part test , it says . \n \n = = Section = = \n \n"
        " More text . \n \n = Beta = \n \n Beta 's page . \n \n", encoding="utf-8")
    (tmp_path / "wikitext2" / "valid.txt").write_text(" \n = Gamma = \n \n Gamma text . \n", encoding="utf-8")
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "valid.txt").write_text(" first sentence here \n second one N \n", encoding="utf-8")
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("raw, expected", [
    ("a 3 @-@ part , b @,@ c @.@ d", "a 3-part, b,c.d"),
    ("x : y ; z . w ! v ? u", "x: y; z. w! v? u"),
    ("( inside ) [ box ] { set }", "(inside) [box] {set}"),
    ('he said " hello there " .', 'he said "hello there" .'),
    ("= = = = Deep = = = =", "==== Deep ===="),
    ("= = Section = =", "== Section =="),
    ("Teddy 's Story", "Teddy's Story"),
    ("the players ' union", "the players' union"),
    ("in N years", "in 1 years"),
    ("line one \n line two", "line one\nline two"),
    ("30 ° C", "30°C"),
    ("an <unk> stays", "an <unk> stays"),
])
def test_wikitext_detokenize_known_strings(raw, expected):
    assert wikitext_detokenize(raw) == expected


def test_wikitext_corpus_joins_hf_rows_with_blank_lines_and_detokenises(data_root):
    # HF rows: "" for a blank line, line + "\n" otherwise; joined with "\n\n"
    raw = load_corpus("wikitext2", "validation", detokenize=False)
    assert raw == "\n\n = Gamma = \n\n\n\n\n Gamma text . \n"
    assert load_corpus("wikitext2", "valid") == wikitext_detokenize(raw)
    assert "Alpha is a 3-part test, it says.\n" in load_corpus("wikitext2")  # default split: test


def test_ptb_is_validation_only_and_not_detokenised(data_root, monkeypatch):
    import alsparse.data.text as text

    # without `datasets` (lm-eval in the test extra brings it; with it, an online user gets the hub's split)
    monkeypatch.setattr(text, "_datasets_available", lambda: False)
    assert load_corpus("ptb") == "first sentence here\n\nsecond one N"
    with pytest.raises(ValueError, match="not available locally.*validation"):
        load_corpus("ptb", "test")


def test_local_text_file_is_read_verbatim(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("Some text , here .\n", encoding="utf-8")
    assert load_corpus(str(path)) == "Some text , here .\n"


def test_unknown_corpus_lists_known_names():
    with pytest.raises(ValueError, match="ptb, wikitext2"):
        load_corpus("c4")


def test_documents_start_at_top_level_headings(data_root):
    docs = documents("wikitext2", "test")
    assert len(docs) == 2
    assert docs[0].startswith(" = Alpha = ") and "= = Section = =" in docs[0]
    assert docs[1].startswith(" = Beta = ") and docs[1].endswith("\n")  # file read with split("\n")


def test_split_wikitext_documents_skips_empty_leading_page():
    lines = [" ", " = A = ", " x ", " = = B = = ", " y ", " = C = ", " z "]
    assert split_wikitext_documents(lines) == [" = A = \n x \n = = B = = \n y ", " = C = \n z "]


def test_documents_only_for_wikitext2():
    with pytest.raises(ValueError, match="wikitext2"):
        documents("ptb")


def test_missing_data_file_names_every_path_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as error:
        paths.data_file("tasks/piqa.jsonl")
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "tasks" / "piqa.jsonl") in message
    assert "ALSPARSE_DATA" in message
    with pytest.raises(FileNotFoundError, match="nowhere"):
        paths.data_dir()


def test_default_lookup_tries_repo_and_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path / "..")
    repo_default = (Path(paths.__file__).resolve().parents[3].parent / "shared" / "data").resolve()
    cwd_default = (Path.cwd().parent / "shared" / "data").resolve()
    assert paths.candidate_dirs()[0] == repo_default
    assert cwd_default in paths.candidate_dirs()
    with pytest.raises(FileNotFoundError) as error:
        paths.data_file("no/such/file.txt")
    assert str(repo_default / "no" / "such" / "file.txt") in str(error.value)
    assert str(cwd_default / "no" / "such" / "file.txt") in str(error.value)
