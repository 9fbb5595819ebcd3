"""Token loading streams: files are read as far as needed, an impossible n_tokens is refused before any token is
read, and nothing builds a Python list of every token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import make_identity_sae, make_tiny_model, make_token_ids

from pytest_saecheck import demo, loading
from pytest_saecheck.demo.language import make_sequences
from pytest_saecheck.errors import ConfigError, LoadError
from pytest_saecheck.loading import progress


def _id_rows(n_rows: int, length: int) -> list[dict[str, list[int]]]:
    ids = make_token_ids(n_sequences=n_rows, seq_len=length)
    return [{"input_ids": [int(v) for v in row]} for row in ids]


def test_parquet_is_read_a_record_batch_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _id_rows(400, 16)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ids.parquet", row_group_size=50)
    (tmp_path / "ids.jsonl").write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")

    def whole_table(*args: object, **kwargs: object) -> None:
        raise AssertionError("the whole table was read")

    monkeypatch.setattr(pq, "read_table", whole_table)
    read: list[int] = []
    original = pq.ParquetFile.iter_batches

    def counting(self: pq.ParquetFile, *args: object, **kwargs: object):
        for batch in original(self, *args, **kwargs):
            read.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    model, sae = make_tiny_model(), make_identity_sae()
    got = loading.load_tokens(str(tmp_path / "ids.parquet"), model, sae, n_tokens=64, context_size=16)
    want = loading.load_tokens(str(tmp_path / "ids.jsonl"), model, sae, n_tokens=64, context_size=16)
    assert torch.equal(got, want)
    assert got.shape == (4, 16)
    assert sum(read) < len(rows)  # stopped after the rows it needed, not the whole file


@pytest.mark.parametrize("suffix", [".npy", ".jsonl", ".txt", ".parquet"])
def test_n_tokens_beyond_the_source_is_refused_before_reading(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"small{suffix}"
    rows = _id_rows(20, 16)
    if suffix == ".npy":
        np.save(path, make_token_ids(n_sequences=20, seq_len=16))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    elif suffix == ".txt":
        path.write_text("a short text\n\nanother one", encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    model, sae = make_tiny_model(), make_identity_sae()
    with pytest.raises(
        ConfigError, match=r"n_tokens=200,000,000 asks for 200,000,000 tokens .*small"
    ) as error:
        loading.load_tokens(str(path), model, sae, n_tokens=200_000_000, context_size=16)
    assert "lower n_tokens" in str(error.value)


def test_a_one_stream_npy_is_read_no_further_than_needed(tmp_path: Path) -> None:
    stream = np.arange(1, 100_001, dtype=np.int32)
    np.save(tmp_path / "stream.npy", stream)
    model, sae = make_tiny_model(), make_identity_sae()
    tokens = loading.load_tokens(str(tmp_path / "stream.npy"), model, sae, n_tokens=40, context_size=10)
    assert tokens.dtype == torch.long
    assert tokens.tolist() == [list(range(1 + 10 * r, 11 + 10 * r)) for r in range(4)]
    documents = list(loading.local_documents(tmp_path / "stream.npy", max_tokens=25))
    assert len(documents) == 1 and documents[0].tolist() == list(range(1, 26))


def test_an_object_npy_is_a_load_error_naming_the_file(tmp_path: Path) -> None:
    np.save(tmp_path / "objects.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    model, sae = make_tiny_model(), make_identity_sae()
    with pytest.raises(LoadError, match=r"objects\.npy.*no object arrays"):
        loading.load_tokens(str(tmp_path / "objects.npy"), model, sae, n_tokens=2, context_size=2)


def test_demo_tokens_are_the_packed_sequences_without_a_list_of_every_token() -> None:
    ids, _ = make_sequences(40, 33, seed=5, split=demo.HELDOUT_SPLIT)
    assert torch.equal(demo.load_tokens(40, 33, seed=5, device="cpu"), torch.tensor(ids))


def test_loading_bars_are_silent_when_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    progress.set_quiet(True)
    try:
        with progress.loading_bar(10, "quiet", shown=True) as bar:
            bar.update(10)
            assert bar.disable
    finally:
        progress.set_quiet(False)
    with progress.loading_bar(10, "off", shown=False) as bar:
        assert bar.disable
    assert "quiet" not in capsys.readouterr().err
