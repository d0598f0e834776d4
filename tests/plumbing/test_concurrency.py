"""Two runs at once lose nothing (issue #22): real processes, released together by a barrier file,
race for the model cache, one --out, one checkpoint directory and one sweep results file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alsparse import locks
from alsparse.cli import main

# The slow imports come before the barrier, so the racers reach the contested step within
# milliseconds of each other.
# Whoever wins a lock keeps it at least HOLD_S seconds, so a racer that starts late still finds it
# taken and the outcome does not depend on how the OS schedules the processes.
HOLD_S = 2.0
_RACER = textwrap.dedent(f"""
    import contextlib, os, sys, time
    import torch, transformers
    from alsparse.cli import main
    import alsparse.api, alsparse.sweep, alsparse.sources
    from alsparse import locks
    real = locks.exclusive

    @contextlib.contextmanager
    def held_a_while(*args, **kwargs):
        with real(*args, **kwargs):
            time.sleep({HOLD_S})
            yield

    locks.exclusive = held_a_while
    barrier = sys.argv[1]
    print("ready", flush=True)
    while not os.path.exists(barrier):
        time.sleep(0.001)
    sys.exit(main(sys.argv[2:]))
""")


def _race(tmp_path: Path, argvs: list[list[str]], env: dict | None = None, timeout: float = 300):
    """Start one process per argv, wait until all have imported, release them together.
    Returns [(returncode, stdout, stderr)] in argv order."""
    barrier = tmp_path / f"barrier-{time.monotonic_ns()}"
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(barrier), *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
             for argv in argvs]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        barrier.touch()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


# --- the lock itself ----------------------------------------------------------------------------


def test_lock_nests_in_one_process_and_refuses_another(tmp_path):
    lock = tmp_path / ".thing.lock"
    holder = textwrap.dedent(f"""
        import sys
        from alsparse.locks import exclusive, InUseError
        try:
            with exclusive({str(lock)!r}, "the thing"):
                print("got it")
        except InUseError as exc:
            print("refused:", exc)
    """)
    with locks.exclusive(lock, "the thing"):
        with locks.exclusive(lock, "the thing"):  # nested in the same process: fine
            assert locks.held(lock)
        assert locks.held(lock)
        other = subprocess.run([sys.executable, "-c", holder], capture_output=True, text=True, timeout=60)
        assert other.stdout.startswith("refused: the thing is in use by another alsparse run (process "
                                       f"{os.getpid()}"), other.stdout + other.stderr
    assert not locks.held(lock)
    again = subprocess.run([sys.executable, "-c", holder], capture_output=True, text=True, timeout=60)
    assert again.stdout.strip() == "got it", "a released lock (its file left behind) blocks nobody"


def test_a_killed_holder_leaves_no_lock(tmp_path):
    lock = tmp_path / ".thing.lock"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from alsparse.locks import exclusive
        with exclusive({str(lock)!r}, "the thing"):
            print("holding", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "holding"
        with pytest.raises(locks.InUseError, match="the thing is in use"):
            with locks.exclusive(lock, "the thing"):
                pass
    finally:
        child.kill()
        child.wait(timeout=60)
    with locks.exclusive(lock, "the thing", wait=10):  # the OS dropped the dead process's lock
        assert locks.held(lock)


def test_a_filesystem_without_locks_warns_and_runs_unguarded(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl
    import logging

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="alsparse.locks"):
        with locks.exclusive(tmp_path / ".x.lock", "the thing"):
            ran = True
    assert ran and "the thing: this filesystem has no OS file locks" in caplog.text
    assert not locks.held(tmp_path / ".x.lock")


def test_nested_holders_release_in_any_order(tmp_path):
    import contextlib

    lock = tmp_path / "sub" / ".." / ".thing.lock"  # another spelling of the same file
    first, second = contextlib.ExitStack(), contextlib.ExitStack()
    first.enter_context(locks.exclusive(tmp_path / ".thing.lock", "the thing"))
    second.enter_context(locks.exclusive(lock, "the thing"))
    first.close()  # the outer holder lets go first: the inner one still holds the OS lock
    assert locks.held(lock)
    second.close()
    assert not locks.held(lock)


# --- the model cache ----------------------------------------------------------------------------


def write_tiny_gguf(path: Path, vocab: int = 2000) -> None:
    """A 2-block LLaMA GGUF (float32 tensors) with the first ``vocab`` tokens of the embedded
    SmolLM2's BPE tokenizer: converting it exercises the same transformers code as the real one."""
    import gguf
    import numpy as np

    from alsparse.sources import smollm2_gguf

    reader = gguf.GGUFReader(str(smollm2_gguf()))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()[:vocab]
    kept = set(tokens)
    dims = {"llama.block_count": 2, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
            "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
            "llama.context_length": 256, "llama.vocab_size": vocab}
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type", "general.quantization_version"):
            continue
        value = dims.get(key) if key in dims else field.contents()
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
            value = value[:vocab]
        elif key == "tokenizer.ggml.merges":
            value = [m for m in value if m.replace(" ", "") in kept and all(p in kept for p in m.split(" "))]
        writer.add_key_value(key, value, field.types[0], field.types[1] if len(field.types) > 1 else None)
    rng = np.random.default_rng(0)
    hidden, ffn, kv = 64, 128, 32

    def add(name, *shape):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    add("token_embd.weight", vocab, hidden)
    for b in range(2):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{b}.{norm}.weight", np.ones(hidden, np.float32))
        add(f"blk.{b}.attn_q.weight", hidden, hidden)
        add(f"blk.{b}.attn_k.weight", kv, hidden)
        add(f"blk.{b}.attn_v.weight", kv, hidden)
        add(f"blk.{b}.attn_output.weight", hidden, hidden)
        add(f"blk.{b}.ffn_gate.weight", ffn, hidden)
        add(f"blk.{b}.ffn_up.weight", ffn, hidden)
        add(f"blk.{b}.ffn_down.weight", hidden, ffn)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_gguf(path)
    return path


def _cached(cache: Path) -> Path:
    (target,) = [p for p in (cache / "models").iterdir() if not p.name.startswith(".")]
    return target


def test_racing_conversions_convert_once_and_all_succeed(tiny_gguf, tmp_path):
    from alsparse.sources import cache_complete

    cache = tmp_path / "cache"
    results = _race(tmp_path, [["-v", "eval", str(tiny_gguf), "--ppl", ""]] * 3, env={"ALSPARSE_CACHE": str(cache)})
    for code, _, err in results:
        assert code == 0, err
    converting = sum(err.count("converting ") for _, _, err in results)
    waited = sum(err.count("converted by another process meanwhile") for _, _, err in results)
    assert converting == 1 and waited == 2, [err[-2000:] for _, _, err in results]
    target = _cached(cache)
    assert cache_complete(target, tiny_gguf)
    assert sorted(p.name for p in (cache / "models").iterdir()) == [f".{target.name}.lock", target.name], \
        "no temporary directory is left behind"


def test_an_incomplete_or_foreign_cache_is_converted_again(tiny_gguf, tmp_path, monkeypatch, caplog):
    import logging

    from alsparse import sources

    monkeypatch.setenv("ALSPARSE_CACHE", str(tmp_path / "cache"))
    target = sources.resolve(str(tiny_gguf))
    weights = target / "model.safetensors"
    good = weights.read_bytes()
    calls = []
    monkeypatch.setattr(sources, "_convert", lambda g, t, real=sources._convert: (calls.append(t), real(g, t)))

    assert sources.resolve(str(tiny_gguf)) == target and calls == [], "a complete cache is used as it is"
    weights.write_bytes(good[: len(good) // 2])  # a conversion cut short, or a disk error
    with caplog.at_level(logging.WARNING, logger="alsparse.sources"):
        sources.resolve(str(tiny_gguf))
    assert len(calls) == 1 and weights.read_bytes() == good
    assert "cut short" in caplog.text and "converting again" in caplog.text

    (target / sources.CACHE_MARKER).unlink()  # no marker (killed before it, or an older alsparse)
    sources.resolve(str(tiny_gguf))
    assert len(calls) == 2 and (target / sources.CACHE_MARKER).is_file()

    marker = json.loads((target / sources.CACHE_MARKER).read_text())  # same name, other source bytes
    marker["source"].update(mtime_ns=1, sha256="0" * 64)
    (target / sources.CACHE_MARKER).write_text(json.dumps(marker))
    sources.resolve(str(tiny_gguf))
    assert len(calls) == 3

    marker = json.loads((target / sources.CACHE_MARKER).read_text())  # touched, same bytes: still valid
    marker["source"]["mtime_ns"] = 1
    (target / sources.CACHE_MARKER).write_text(json.dumps(marker))
    sources.resolve(str(tiny_gguf))
    assert len(calls) == 3
    refreshed = json.loads((target / sources.CACHE_MARKER).read_text())["source"]["mtime_ns"]
    assert refreshed == tiny_gguf.stat().st_mtime_ns, "the new mtime is remembered: no hashing on every load"

    stale = target.parent / f".{target.name}.tmp-dead1234"  # a killed conversion's leftovers
    stale.mkdir()
    (target / "config.json").unlink()
    sources.resolve(str(tiny_gguf))
    assert len(calls) == 4 and not stale.exists()


# --- the output directory and the checkpoints ---------------------------------------------------


def _prune(root: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(root / "model"), "--calib", str(root / "corpus.txt"), "--nsamples", "4", "--seqlen", "16",
            "--method", "sparsegpt", "--allocation", "als", "--als-tokens", "32", "--als-strength", "0.1", "--out", str(out), *extra]


def _same_weights(a: Path, b: Path) -> bool:
    got, want = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_racing_prunes_to_one_out_write_it_once(tiny_model_dir, tmp_path):
    reference = tmp_path / "reference"
    assert main(_prune(tiny_model_dir, reference)) == 0
    out = tmp_path / "out"
    for extra in ((), ("--overwrite",)):  # a fresh --out, then both replacing the one there
        results = _race(tmp_path, [_prune(tiny_model_dir, out, *extra)] * 2)
        codes = sorted(code for code, _, _ in results)
        assert codes == [0, 2], [err[-1500:] for _, _, err in results]
        for code, _, err in results:
            if code == 2:
                assert f"output directory {out} is in use by another alsparse run (" in err
        assert _same_weights(out, reference), "the winner's files are whole"
        assert json.loads((out / "alsparse_report.json").read_text())["summary"]["achieved_sparsity"] == 0.5
    assert not (tmp_path / "out.alsparse-ckpt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [".out.alsparse-ckpt.lock", ".out.lock"]


def test_racing_resumes_of_one_run_do_not_interleave(tiny_model_dir, tmp_path, monkeypatch):
    import alsparse.checkpoint as ck

    reference = tmp_path / "reference"
    assert main(_prune(tiny_model_dir, reference)) == 0
    out = tmp_path / "out"
    save_block = ck.BlockCheckpoints.save_block

    def interrupted_after_block_0(self, index, tensors):
        save_block(self, index, tensors)
        if index == 0:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ck.BlockCheckpoints, "save_block", interrupted_after_block_0)
        assert main(_prune(tiny_model_dir, out)) == 130
    assert (tmp_path / "out.alsparse-ckpt" / "block-00000.safetensors").is_file() and not out.exists()
    results = _race(tmp_path, [_prune(tiny_model_dir, out, "--resume")] * 2)
    assert sorted(code for code, _, _ in results) == [0, 2], [err[-1500:] for _, _, err in results]
    winner = next(err for code, _, err in results if code == 0)
    loser = next(err for code, _, err in results if code == 2)
    assert "blocks before 1 came from the checkpoints" in winner
    assert f"output directory {out} is in use by another alsparse run (" in loser, loser[-1500:]
    assert _same_weights(out, reference)


def test_a_checkpoint_directory_in_use_is_refused(tmp_path):
    from alsparse.checkpoint import BlockCheckpoints

    directory = tmp_path / "ckpt"
    opener = textwrap.dedent(f"""
        import sys, time
        from alsparse.checkpoint import BlockCheckpoints
        from alsparse.locks import InUseError
        ckpt = BlockCheckpoints({str(directory)!r})
        try:
            ckpt.open({{"run": 1}}, resume=True)
        except InUseError as exc:
            print("refused:", exc, flush=True)
            sys.exit(0)
        print("opened", flush=True)
        time.sleep(float(sys.argv[1]))
        ckpt.release()
    """)
    holder = subprocess.Popen([sys.executable, "-c", opener, "600"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "opened"
        other = subprocess.run([sys.executable, "-c", opener, "0"], capture_output=True, text=True, timeout=60)
        assert other.stdout.startswith(f"refused: checkpoint directory {directory} is in use"), other.stderr
    finally:
        holder.kill()
        holder.wait(timeout=60)
    ckpt = BlockCheckpoints(directory)
    assert ckpt.open({"run": 1}, resume=True) is None  # free again once the holder is gone
    ckpt.release()


# --- the sweep results file ---------------------------------------------------------------------


def test_racing_sweeps_on_one_results_file_lose_and_duplicate_nothing(tiny_model_dir, tmp_path):
    import yaml

    from alsparse.results import read_records
    from alsparse.sweep import load_spec

    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir / "model"),
        "calibration": {"corpus": str(tiny_model_dir / "corpus.txt"), "nsamples": 4, "seqlen": 16, "seeds": [0]},
        "eval": {"ppl": [str(tiny_model_dir / "corpus.txt")], "seq_len": 32, "limit": 2},
        "grid": [{"methods": ["magnitude", "wanda"], "allocations": ["uniform"], "sparsities": [0.5, 0.6]}],
    }))
    results = tmp_path / "results.jsonl"
    raced = _race(tmp_path, [["sweep", str(config), "--results", str(results)]] * 2)
    codes = sorted(code for code, _, _ in raced)
    assert codes == [0, 2], [err[-1500:] for _, _, err in raced]
    for code, _, err in raced:
        if code == 2:
            assert f"results file {results} is in use by another alsparse run" in err
    ids = [r["id"] for r in read_records(results)]
    planned = {c.id for c in load_spec(config).cells}
    assert sorted(ids) == sorted(planned) and len(ids) == len(set(ids))
