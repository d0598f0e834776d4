"""Shared fixtures: tiny random models of every supported family, the real model, the data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=64)


def tiny_config(family: str):
    import transformers as tf

    n_layers = 3
    if family in ("llama", "mistral", "qwen2", "qwen3", "phi3"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config, "phi3": tf.Phi3Config}[family]
        extra = {"sliding_window": None} if family in ("mistral", "qwen2", "qwen3") else {}
        extra.update({"head_dim": 8} if family == "qwen3" else {})
        extra.update({"bos_token_id": 1, "eos_token_id": 2} if family == "phi3" else {})
        return cls(num_hidden_layers=n_layers, num_key_value_heads=2, pad_token_id=0, **TINY, **extra)
    if family == "gemma":
        return tf.GemmaConfig(num_hidden_layers=n_layers, num_key_value_heads=2, head_dim=8, **TINY)
    if family == "gemma2":
        return tf.Gemma2Config(num_hidden_layers=n_layers, num_key_value_heads=2, head_dim=8, sliding_window=4, **TINY)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(
            num_hidden_layers=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"], **TINY
        )
    if family == "opt":
        return tf.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=n_layers,
                            max_position_embeddings=64, word_embed_proj_dim=32, enable_bias=True)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=n_layers, n_head=4, n_positions=64,
                             bos_token_id=1, eos_token_id=2)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                num_hidden_layers=n_layers, max_position_embeddings=64)
    raise KeyError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "opt", "gpt2", "gpt_neox"]


def make_tiny(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager")
    return model.eval()


def confident_llama():
    """A tiny llama with confident predictions: its matrices scaled up 5x."""
    model = make_tiny("llama")
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(5.0)
    return model


def sample_from(model, windows: int, generator: torch.Generator, length: int = 16) -> torch.Tensor:
    """``windows`` token windows of ``length`` sampled from ``model`` itself (it predicts them well)."""
    ids = torch.randint(1, 96, (windows, 1), generator=generator)
    with torch.no_grad():
        for _ in range(length - 1):
            probs = torch.softmax(model(input_ids=ids).logits[:, -1].float(), dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids


def make_fragile(block: int, windows: int = 8, strong: float = 3.0, weak: float = 0.3):
    """A confident tiny llama whose block ``block`` carries the signal (attention and MLP outputs 10x
    those of the others), and windows sampled from it, so the dense model predicts them well and
    pruning the fragile block hard costs held-out loss."""
    from alsparse.models import decoder_blocks, find_linears

    model = confident_llama()
    with torch.no_grad():
        for i, b in enumerate(decoder_blocks(model)):
            for ref in find_linears(b):
                if ref.name.endswith(("down_proj", "o_proj")):
                    ref.module.weight.mul_(strong if i == block else weak)
    return model, sample_from(model, windows, torch.Generator().manual_seed(0))


@pytest.fixture(params=FAMILIES)
def tiny_family(request):
    return request.param


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 96, (4, 16), generator=g)


def data_dir() -> Path:
    env = os.environ.get("ALSPARSE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def real_model_dir():
    """The real SmolLM2-135M as a cached HF directory (converted from the PyPI GGUF once)."""
    from alsparse.sources import DEFAULT_MODEL, resolve

    env = os.environ.get("ALSPARSE_TEST_MODEL_DIR")
    if env and Path(env, "config.json").is_file():
        return Path(env)
    return Path(resolve(DEFAULT_MODEL))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("ALSPARSE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow tier: set ALSPARSE_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there one all we their been has when who will more no if out so said what up its about into "
    "than them can only other new some time could these two may then do first any my now such like our over man me "
    "even most made after also did many before must through back years where much your way well down should because"
).split()[:90]  # ids 3..92 fit the tiny models' vocabulary of 96


def tiny_tokenizer():
    """An offline word-level tokenizer over WORDS (ids 3..), with <unk>=0, <s>=1, </s>=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def word_text(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    lines = [" ".join(WORDS[i] for i in idx[k : k + 20]) for k in range(0, n_words, 20)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random LLaMA with a tokenizer, saved as a normal HF directory, plus a text corpus."""
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny("llama")
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "corpus.txt").write_text(word_text(4000))
    return root


class TableLM(torch.nn.Module):
    """logits[t] = table[input_ids[t]] (a bigram model; a unigram one when all rows are equal);
    records every input it sees. ``strict_cache``: fail unless called with use_cache=False."""

    def __init__(self, table: torch.Tensor, strict_cache: bool = False):
        super().__init__()
        self.table = table  # [V, V]
        self.strict_cache = strict_cache
        self.inputs: list[list[int]] = []

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        from types import SimpleNamespace

        assert use_cache is False or not self.strict_cache
        self.inputs.extend(input_ids.tolist())
        return SimpleNamespace(logits=self.table[input_ids])


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def weighted_mean(s, sizes) -> float:
    sizes = torch.as_tensor(sizes, dtype=torch.float64)
    return float(torch.sum(s * sizes) / sizes.sum())
