"""Text sources: local files (txt, json, jsonl, parquet; file, folder, glob), text-field
detection, saved and hub-style datasets, "python-docs", fingerprints, and the errors."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harvest import pydocs
from harvest.sources import hub_documents
from harvest.text import TextError, iter_documents, source_fingerprint
from settings import DataConfig


def docs_of(path: str, **kw) -> list[str]:
    return [text for _, text in iter_documents(DataConfig(train_path=path, **kw))]


def write_parquet(path, columns: dict) -> None:
    pq.write_table(pa.table(columns), path)


def test_json_jsonl_and_parquet_fields_are_detected(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": 1, "content": "first"}\n\n{"id": 2, "content": "second"}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"meta": 1, "body": "third"}, {"meta": 2, "body": "  "}]))
    (tmp_path / "c.json").write_text(json.dumps({"version": 1, "data": [{"text": "fourth", "title": "t"}]}))
    (tmp_path / "d.json").write_text('{"article": "fifth"}\n{"article": "sixth"}\n')  # JSON Lines named .json
    write_parquet(tmp_path / "e.parquet", {"n": [1, 2], "only_string": ["seventh", None]})
    (tmp_path / "f.json").write_text(json.dumps(["eighth", "ninth"]))
    assert docs_of(str(tmp_path / "a.jsonl")) == ["first", "second"]
    assert docs_of(str(tmp_path / "b.json")) == ["third"]  # whitespace-only text skipped
    assert docs_of(str(tmp_path / "c.json")) == ["fourth"]
    assert docs_of(str(tmp_path / "d.json")) == ["fifth", "sixth"]
    assert docs_of(str(tmp_path / "e.parquet")) == ["seventh"]
    assert docs_of(str(tmp_path / "f.json")) == ["eighth", "ninth"]
    # A folder reads every supported file, sorted by name; a glob picks some of them.
    assert docs_of(str(tmp_path)) == ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
                                      "ninth"]
    assert docs_of(str(tmp_path / "[ae].*")) == ["first", "second", "seventh"]
    assert list(iter_documents(DataConfig(train_path=str(tmp_path), max_samples=3))) == [
        (0, "first"), (1, "second"), (2, "third")]


def test_text_field_override_and_errors_name_the_fields(tmp_path):
    (tmp_path / "two.jsonl").write_text('{"title": "a title", "summary": "a summary"}\n')
    write_parquet(tmp_path / "p.parquet", {"text": ["default"], "other": ["override"]})
    assert docs_of(str(tmp_path / "two.jsonl"), text_field="summary") == ["a summary"]
    assert docs_of(str(tmp_path / "p.parquet")) == ["default"]
    assert docs_of(str(tmp_path / "p.parquet"), text_field="other") == ["override"]
    with pytest.raises(TextError, match=r"cannot tell which field .*title, summary.*set data.text_field"):
        docs_of(str(tmp_path / "two.jsonl"))
    with pytest.raises(TextError, match=r"no field 'missing' \(fields: text, other\)"):
        docs_of(str(tmp_path / "p.parquet"), text_field="missing")
    (tmp_path / "num.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(TextError, match="holds a int, not text"):
        docs_of(str(tmp_path / "num.jsonl"))


def test_txt_file_splits_on_blank_lines_and_folders_take_whole_files(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "b.txt").write_text("para one\nline two\n\n\n  \npara two\n")
    (tmp_path / "corpus" / "a.txt").write_text("whole file\n\nsecond paragraph")
    (tmp_path / "corpus" / "notes.md").write_text("not a supported type")
    (tmp_path / "corpus" / ".hidden.txt").write_text("hidden")
    (tmp_path / "corpus" / "sub").mkdir()
    (tmp_path / "corpus" / "sub" / "c.txt").write_text("nested")
    assert docs_of(str(tmp_path / "corpus" / "b.txt")) == ["para one\nline two", "para two"]
    assert docs_of(str(tmp_path / "corpus")) == [
        "whole file\n\nsecond paragraph", "para one\nline two\n\n\n  \npara two\n", "nested"]
    assert docs_of(str(tmp_path / "corpus" / "**" / "*.txt")) == docs_of(str(tmp_path / "corpus"))


def test_missing_empty_and_unsupported_inputs_give_clear_errors(tmp_path):
    with pytest.raises(TextError, match=r"no such file or folder .*nope.*need a network.*data.train_path"):
        docs_of(str(tmp_path / "nope"))
    with pytest.raises(TextError, match="no such file or folder ./data/x.jsonl"):
        docs_of("./data/x.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(TextError, match="holds no documents"):
        docs_of(str(tmp_path / "empty.jsonl"))
    (tmp_path / "blank.txt").write_text("\n \n\n")
    with pytest.raises(TextError, match="holds no documents"):
        docs_of(str(tmp_path / "blank.txt"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.csv").write_text("a,b")
    with pytest.raises(TextError, match="holds no .txt, .json, .jsonl, .parquet files"):
        docs_of(str(tmp_path / "folder"))
    with pytest.raises(TextError, match="is a .csv file"):
        docs_of(str(tmp_path / "folder" / "x.csv"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(TextError, match="line 2 is not valid JSON"):
        docs_of(str(tmp_path / "bad.jsonl"))
    with pytest.raises(TextError, match="max_samples"):
        docs_of(str(tmp_path / "empty.jsonl"), max_samples=0)


def test_hub_name_offline_gives_the_network_message():
    with pytest.raises(TextError, match="need a network .*HF_DATASETS_OFFLINE=0.*point data.train_path"):
        docs_of("nobody-here/no-such-dataset")


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_loader_path_on_local_data_files(tmp_path, streaming):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"n": i, "raw_content": f"doc {i}"}) + "\n"
                                              for i in range(5)))
    got = list(hub_documents("json", None, "train", streaming, None, data_files=str(tmp_path / "d.jsonl")))
    assert got == [f"doc {i}" for i in range(5)]


def test_save_to_disk_folder_and_its_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": ["x1", "x2"], "k": [1, 2]}),
                               "validation": datasets.Dataset.from_dict({"content": ["v1"], "k": [3]})})
    dd.save_to_disk(str(tmp_path / "saved"))
    assert docs_of(str(tmp_path / "saved")) == ["x1", "x2"]
    assert docs_of(str(tmp_path / "saved"), dataset_split="validation") == ["v1"]
    with pytest.raises(TextError, match=r"no split 'test' \(splits: train, validation\)"):
        docs_of(str(tmp_path / "saved"), dataset_split="test")
    fp = source_fingerprint(DataConfig(train_path=str(tmp_path / "saved")))
    assert fp["source"] == "disk" and fp["split"] == "train"


def test_local_fingerprint_follows_content_not_location(tmp_path):
    src = tmp_path / "one"
    src.mkdir()
    (src / "a.jsonl").write_text('{"text": "alpha"}\n')
    (src / "b.txt").write_text("beta")
    fp = source_fingerprint(DataConfig(train_path=str(src)))
    shutil.copytree(src, tmp_path / "moved")
    assert source_fingerprint(DataConfig(train_path=str(tmp_path / "moved"))) == fp
    assert source_fingerprint(DataConfig(train_path=str(tmp_path / "moved" / "*"))) == fp
    json.dumps(fp)  # JSON-able
    (tmp_path / "moved" / "b.txt").write_text("gamma")
    assert source_fingerprint(DataConfig(train_path=str(tmp_path / "moved"))) != fp
    assert source_fingerprint(DataConfig(train_path=str(src), text_field="text")) != fp
    hub = source_fingerprint(DataConfig(train_path="org/corpus", dataset_name="en", dataset_split="train"))
    assert hub == {"source": "hub", "name": "org/corpus", "config": "en", "split": "train", "text_field": None}


def test_python_docs_is_deduplicated_and_holds_all_three_parts():
    from pydoc_data.topics import topics

    docs = [text for _, text in iter_documents(DataConfig(train_path="python-docs"))]
    assert len(docs) == len(set(docs)) > 1000
    assert all(len(d) >= pydocs.MIN_CHARS and d == d.strip() for d in docs)
    assert docs[0] == topics[sorted(topics)[0]].strip()  # help topics come first, by name
    assert inspect.cleandoc(json.__doc__).strip() in docs  # a stdlib module docstring
    assert inspect.cleandoc(shutil.copytree.__doc__).strip() in docs  # a stdlib function docstring
    payload = importlib.metadata.metadata("datasets").get_payload()
    assert payload.strip() in docs  # an installed distribution's long description
    fp = source_fingerprint(DataConfig(train_path="python-docs"))
    assert fp["documents"] == len(docs) and json.loads(json.dumps(fp)) == fp


def test_python_docs_fingerprint_follows_the_documents(monkeypatch):
    docs = ("a" * 300, "b" * 300)
    monkeypatch.setattr(pydocs, "python_docs", lambda: docs)
    before = source_fingerprint(DataConfig(train_path="python-docs"))
    assert before["documents"] == 2
    monkeypatch.setattr(pydocs, "python_docs", lambda: tuple(docs))  # equal content, new object
    assert source_fingerprint(DataConfig(train_path="python-docs")) == before
    monkeypatch.setattr(pydocs, "python_docs", lambda: ("a" * 300 + "b" * 300,))  # same text, other split
    assert source_fingerprint(DataConfig(train_path="python-docs"))["xxh3"] != before["xxh3"]
    monkeypatch.setattr(pydocs, "python_docs", lambda: ("a" * 300, "c" * 300))
    assert source_fingerprint(DataConfig(train_path="python-docs"))["xxh3"] != before["xxh3"]


def test_python_docs_leaves_out_this_projects_own_readme(monkeypatch):
    import email.message
    import importlib.metadata

    from harvest import pydocs

    def dist(name, body):
        meta = email.message.Message()
        meta["Name"], meta["Version"] = name, "1.0"
        meta.set_payload(body)
        return type("D", (), {"metadata": meta})()

    fakes = [dist("saecache", "our README, which changes with every commit"), dist("Other-Pkg", "another README")]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(fakes))
    assert list(pydocs._distribution_descriptions()) == ["another README"]
