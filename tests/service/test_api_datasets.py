"""Datasets: uploading text and JSONL calibration corpora, and refusing bad or oversized uploads."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest

from app.db.models import Dataset
from app.storage import artifact_store

from .api_helpers import (
    DEMO_JOB,
    assert_problem,
    client_for,
    row_count,
)


def test_upload_text_dataset_and_use_it(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker)
    content = "The first article.\n\nThe second one, with ünïcode.\n".encode()
    response = client.post("/v1/datasets", files={"file": ("wiki.txt", content, "text/plain")}, data={"name": "wiki"})
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert response.headers["location"] == f"/v1/datasets/{dataset['id']}"
    assert dataset["format"] == "txt" and dataset["name"] == "wiki" and dataset["text_field"] is None
    assert dataset["size_bytes"] == len(content)
    assert dataset["sha256"] == hashlib.sha256(content).hexdigest()

    with rollback_sessionmaker() as session:
        row = session.get(Dataset, uuid.UUID(dataset["id"]))
        assert row is not None and row.storage_key == f"datasets/{dataset['id']}/data.txt"
    storage = artifact_store(api_settings)
    with storage.open(f"datasets/{dataset['id']}/data.txt") as fh:
        assert fh.read() == content

    assert client.get(f"/v1/datasets/{dataset['id']}").json() == dataset
    job = client.post("/v1/jobs", json={**DEMO_JOB, "calibration": {"dataset": dataset["reference"]}})
    assert job.status_code == 202, job.text
    assert job.json()["request"]["calibration"]["dataset"] == dataset["id"]


def test_upload_jsonl_counts_documents(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker)
    lines = [json.dumps({"body": f"document {i}", "id": i}) for i in range(5)]
    content = ("\n".join(lines) + "\n\n").encode()
    response = client.post("/v1/datasets", files={"file": ("docs.jsonl", content)}, data={"text_field": "body"})
    assert response.status_code == 201, response.text
    assert response.json()["num_documents"] == 5
    assert response.json()["text_field"] == "body" and response.json()["format"] == "jsonl"


@pytest.mark.parametrize(
    ("filename", "content", "data", "field"),
    [
        ("weights.bin", b"hello", {}, "file"),
        ("corpus.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", {}, "file"),
        ("corpus.txt", b"caf\xe9 latin-1", {}, "file"),
        ("corpus.txt", b"   \n\n", {}, "file"),
        ("docs.jsonl", b'{"text": "ok"}\n{"content": "no text field"}\n', {}, "text_field"),
        ("docs.jsonl", b'{"text": "ok"}\n{"text": 3}\n', {}, "text_field"),
        ("docs.jsonl", b'{"text": "ok"}\n["not", "an", "object"]\n', {}, "file"),
        ("docs.jsonl", b'{"text": "ok"}\n{broken\n', {}, "file"),
        ("corpus.txt", b"plain text", {"text_field": "text"}, "text_field"),
        # Input that was a 500: the parser's recursion, and text no database or tokenizer takes.
        ("docs.jsonl", b'{"text": "ok"}\n{"text": "x", "m": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", {}, "file"),
        ("docs.jsonl", b'{"text": "a NUL \\u0000 escaped"}\n', {}, "file"),
        ("docs.jsonl", b'{"text": "half a character \\ud800"}\n', {}, "file"),
        ("docs.jsonl", b'{"\\ud800": "no text field, and a key that cannot be shown raw"}\n', {}, "text_field"),
    ],
)
def test_bad_uploads_are_422_and_store_nothing(api_settings, rollback_sessionmaker, filename, content, data, field):
    before = row_count(rollback_sessionmaker, Dataset)  # other tests' workers commit datasets in this database
    client = client_for(api_settings, rollback_sessionmaker)
    response = client.post("/v1/datasets", files={"file": (filename, content)}, data=data)
    assert_problem(response, 422, field)
    assert artifact_store(api_settings).list("datasets") == []
    assert row_count(rollback_sessionmaker, Dataset) == before


def test_missing_file_is_422(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker)
    assert_problem(client.post("/v1/datasets", data={"name": "x"}), 422, "file")
    assert_problem(client.get("/v1/datasets/not-a-uuid"), 422, "dataset_id")
    assert_problem(client.get(f"/v1/datasets/{uuid.uuid4()}"), 404)


def test_oversized_upload_is_413_and_stores_nothing(api_settings, rollback_sessionmaker):
    settings = api_settings.model_copy(update={"max_upload_bytes": 2048})
    client = client_for(settings, rollback_sessionmaker)
    # Slightly over the file limit: it passes the request-size guard and is refused while streamed.
    near = client.post("/v1/datasets", files={"file": ("big.txt", b"a" * 3000)})
    assert assert_problem(near, 413)["code"] == "payload_too_large"
    # Far over: refused from its Content-Length before the body is read.
    far = client.post("/v1/datasets", files={"file": ("big.txt", b"a" * 200_000)})
    assert_problem(far, 413)
    assert artifact_store(settings).list("datasets") == []


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        (b'{"text": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", "line 2: the JSON nests deeper than 100 levels"),
        (b'{"text": "a \\u0000 b"}', "line 2: field 'text' must not contain NUL"),
        (b'{"text": "a \\udbff b"}', "line 2: field 'text' holds an unpaired UTF-16 surrogate (\\udbff)"),
        (b'{"t\\ud800": "x"}', "its fields: t\\ud800"),
    ],
)
def test_jsonl_refusals_say_which_line_and_why(api_settings, rollback_sessionmaker, line, needle):
    """A line nested 100,000 deep crashed the upload check (RecursionError, 500)."""
    client = client_for(api_settings, rollback_sessionmaker, raise_server_exceptions=False)
    content = b'{"text": "fine"}\n' + line + b"\n"
    body = assert_problem(client.post("/v1/datasets", files={"file": ("docs.jsonl", content)}), 422)
    assert needle in body["detail"], body


def test_jsonl_nested_within_the_bound_is_accepted(api_settings, rollback_sessionmaker):
    client = client_for(api_settings, rollback_sessionmaker)
    nested = b'{"text": "fine [{", "meta": ' + b"[" * 99 + b"]" * 99 + b"}\n"
    response = client.post("/v1/datasets", files={"file": ("nested.jsonl", nested)})
    assert response.status_code == 201, response.text
