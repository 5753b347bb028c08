"""Data from a stream that can be read only once: `--data -` (stdin), `/dev/stdin`, a pipe, a FIFO.

Every reader (`formats.locate`'s format sniffing, the JSON / CSV / parquet readers, a second pass such as
compare's) reads the bytes once into memory; errors name the source as `<stdin>` or the path given.
Real pipes throughout (`os.pipe`, a subprocess's stdin), no stand-in file objects."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tiny import tiny_llama, tiny_tokenizer

from granular_po.data.formats import load_data, locate
from granular_po.data.schema import DataError

ROWS = [
    {"prompt": "What is 2 + 2?", "correct_response": "2 + 2 = 4. The answer is 4.",
     "incorrect_response": "2 + 2 = 5. The answer is 5.", "masked_regions": [[6, 7, -1]], "answer": "4"},
    {"prompt": "Capital of France?", "correct_response": "Paris.", "incorrect_response": "Madrid.",
     "answer": "Paris"},
]
SRC = Path(__file__).resolve().parents[1] / "src"


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def pipe_path(data: bytes) -> str:
    """A real pipe holding `data` (written by a thread, so a large payload cannot block), as /dev/fd/N."""
    read_fd, write_fd = os.pipe()

    def feed():
        with os.fdopen(write_fd, "wb") as f:
            f.write(data)

    threading.Thread(target=feed, daemon=True).start()
    return f"/dev/fd/{read_fd}"


def parquet_bytes(rows) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def cli(command: str, *args: str, stdin: bytes) -> subprocess.CompletedProcess:
    """`granular-po COMMAND ARGS` in a subprocess whose stdin is a pipe fed `stdin`."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "granular_po.apps.cli", command, *args], input=stdin,
                          capture_output=True, env=env, timeout=300)


@pytest.mark.parametrize("shape", ["jsonl", "json list", "parquet", "jsonl with a BOM"])
def test_load_data_reads_a_pipe_once_in_every_format(tmp_path, shape):
    data = {"jsonl": jsonl(ROWS), "json list": json.dumps(ROWS).encode(), "parquet": parquet_bytes(ROWS),
            "jsonl with a BOM": b"\xef\xbb\xbf" + jsonl(ROWS)}[shape]
    on_disk = tmp_path / "d.data"
    on_disk.write_bytes(data)
    expected, _ = load_data(on_disk)
    path = pipe_path(data)
    assert locate(path).kind == ("parquet" if shape == "parquet" else "json")  # sniffed: the bytes are kept
    records, report = load_data(path)
    assert [(r.prompt, r.chosen, r.rejected, r.regions, r.index) for r in records] == \
        [(r.prompt, r.chosen, r.rejected, r.regions, r.index) for r in expected]
    assert report.source == path and records[0].source == path
    assert load_data(path)[0] == records  # a second reader in this process reads the same bytes


def test_errors_name_the_pipe_and_the_record(tmp_path):
    bad = jsonl([ROWS[0], dict(ROWS[1], incorrect_response="")])
    path = pipe_path(bad)
    with pytest.raises(DataError, match=rf"{path}, record 1, field 'incorrect_response': is empty"):
        load_data(path)
    empty = pipe_path(b"")
    with pytest.raises(DataError, match=rf"{empty}: the file is empty"):
        load_data(empty)


def test_a_fifo_is_read_once(tmp_path):
    fifo = tmp_path / "pairs.fifo"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "wb") as f:
            f.write(jsonl(ROWS))

    threading.Thread(target=feed, daemon=True).start()
    records, report = load_data(str(fifo))
    assert len(records) == 2 and report.source == str(fifo)


def test_eval_reads_stdin_as_dash_and_as_dev_stdin(tmp_path):
    tok = tiny_tokenizer(chat=True)
    from granular_po.models import save_model_dir

    model = save_model_dir(tiny_llama(len(tok)), tok, tmp_path / "model")
    for data in ("-", "/dev/stdin"):
        done = cli("eval", "--model", str(model), "--data", data, "--max-new-tokens", "2", "--device", "cpu",
                   stdin=jsonl(ROWS))
        err = done.stderr.decode()
        assert done.returncode == 0, err[-2000:]
        assert "graded right; 2 records read)" in done.stdout.decode()
    # an error names the stream: <stdin> for -, the path as given otherwise
    done = cli("eval", "--model", str(model), "--data", "-", stdin=b'{"prompt": "a", "answer": 1}\n{"prom\n')
    assert done.returncode == 0 and "record 1: invalid JSON on line 2" in done.stdout.decode()
    done = cli("eval", "--model", "unused", "--data", "-", stdin=b"")
    assert done.returncode == 1 and done.stderr.decode().startswith("invalid data: <stdin>: the file is empty")
    done = cli("eval", "--model", "unused", "--data", "/dev/stdin", stdin=b"[1, 2")
    assert done.returncode == 1 and done.stderr.decode().startswith("invalid data: /dev/stdin: invalid JSON")


def test_inspect_and_annotate_read_stdin(tmp_path):
    tok_dir = tmp_path / "tok"
    tiny_tokenizer("byte_level", chat=True).save_pretrained(tok_dir)
    out = tmp_path / "w.jsonl"
    done = cli("inspect", "-", "--tokenizer", str(tok_dir), "--json", str(out), stdin=jsonl(ROWS))
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().startswith("<stdin>: read 2 records, kept 2, 1 region\n")
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0, 1]
    pairs = [{"prompt": "7 * 8?", "correct_response": "It is 56.", "incorrect_response": "It is 54."}]
    done = cli("annotate", "-", str(tmp_path / "a.jsonl"), stdin=jsonl(pairs))
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert json.loads((tmp_path / "a.jsonl").read_text())["masked_regions"] == [[6, 8, -1]]


def test_compare_data_from_a_pipe_is_written_once_as_json(tmp_path):
    """compare reads its data twice (validation, then the split) and its runs read the files it names: a
    pipe is read once, and given as --train it is written under <out>/data, never named to the runs."""
    from granular_po.apps import compare

    rows = [{"prompt": f"What is {i} + 1?", "correct_response": f"It is {i + 1}.",
             "incorrect_response": f"It is {i}.", "answer": str(i + 1)} for i in range(10)]
    args = compare.build_parser().parse_args(["--data", pipe_path(jsonl(rows)), "--split", "0.6,0.2,0.2"])
    paths = compare.file_data(tmp_path / "out", args)
    split = [r for p in paths.values() for r in json.loads(p.read_text())]
    assert sorted(r["prompt"] for r in split) == sorted(r["prompt"] for r in rows)
    test = tmp_path / "test.jsonl"
    test.write_bytes(jsonl(rows[:2]))
    args = compare.build_parser().parse_args(["--train", pipe_path(jsonl(rows)), "--val", str(test),
                                              "--test", str(test)])
    paths = compare.file_data(tmp_path / "again", args)
    assert paths["train"] == tmp_path / "again" / "data" / "train.json"
    assert json.loads(paths["train"].read_text()) == rows
