"""The API refuses a budget the model's depth cannot satisfy, wherever the depth can be read without weights.

The demo model (its GGUF header), a local directory (config.json) or .gguf file under a model root,
an ``s3://`` prefix's config.json on the S3 server, and a hub config already in the local cache: each
answers 422 naming the field with the allowed range, and nothing is recorded or queued. Where the
depth cannot be known (a hub model never downloaded here), the job is accepted and the worker decides.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from gguf import GGUFWriter

from app.core.config import Settings

from .api_helpers import assert_problem, client_for, job_count, queued_messages
from .moto_server import ACCESS_KEY, REGION, SECRET_KEY, create_bucket

DEMO_BLOCKS = 30  # SmolLM2-135M; blocks 0 and 29 are protected by default, so 28 may go


def submit(settings: Settings, factory: Any, model: str, **body: Any) -> Any:
    client = client_for(settings, factory)
    return client.post("/v1/jobs", json={"model": {"id": model}, "target": {"num_layers": 2}, **body})


@pytest.mark.parametrize(
    ("body", "field", "needle"),
    [
        ({"target": {"num_layers": 1000}}, "target.num_layers", "1 <= target.num_layers <= 28"),
        ({"target": {"num_layers": 29}}, "target.num_layers", "28 can be removed"),
        ({"target": {"ratio": 0.99}}, "target.ratio", "is 29 blocks"),
        ({"options": {"protected_layers": [0, 30]}}, "options.protected_layers", "out of range"),
        ({"target": {"num_layers": 31}, "options": {"protected_layers": []}}, "target.num_layers", "<= 30"),
        ({"options": {"num_clusters": 29}}, "options.num_clusters", "2 <= options.num_clusters <= 28"),
        ({"evaluation": {"curve_budgets": [4, 29]}}, "evaluation.curve_budgets.1", "cannot remove 29 blocks"),
    ],
)
def test_the_demo_models_depth_bounds_the_budget(api_settings, rollback_sessionmaker, redis_url, body, field, needle):
    before = job_count(rollback_sessionmaker)
    problem = assert_problem(submit(api_settings, rollback_sessionmaker, "demo", **body), 422, field)
    assert needle in problem["detail"], problem["detail"]
    assert f"{DEMO_BLOCKS} decoder blocks" in problem["detail"]
    assert job_count(rollback_sessionmaker) == before
    assert queued_messages(redis_url, api_settings.queue_name) == []


@pytest.mark.parametrize(
    "body",
    [
        {"target": {"num_layers": 28}},
        {"target": {"ratio": 0.95}},  # floor(0.95 * 30) = 28
        {"target": {"num_layers": 30}, "options": {"protected_layers": []}},
        {"options": {"num_clusters": 28}},
        {"evaluation": {"curve_budgets": [1, 28]}},
    ],
)
def test_budgets_at_the_limit_are_accepted(api_settings, rollback_sessionmaker, body):
    response = submit(api_settings, rollback_sessionmaker, "demo", **body)
    assert response.status_code == 202, response.text


def test_a_local_directory_and_gguf_under_a_model_root(api_settings, rollback_sessionmaker, tiny_tokenizer):
    from tiny import save_tiny_llama

    root = api_settings.model_roots[0]
    directory = save_tiny_llama(root, "tiny", tiny_tokenizer, num_hidden_layers=6)
    problem = assert_problem(
        submit(api_settings, rollback_sessionmaker, str(directory), target={"num_layers": 5}), 422, "target.num_layers"
    )
    assert "6 decoder blocks" in problem["detail"] and "<= 4" in problem["detail"]
    assert submit(api_settings, rollback_sessionmaker, str(directory), target={"num_layers": 4}).status_code == 202

    gguf = root / "deep.gguf"
    writer = GGUFWriter(str(gguf), "llama")
    writer.add_block_count(12)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    problem = assert_problem(
        submit(api_settings, rollback_sessionmaker, str(gguf), target={"ratio": 0.95}), 422, "target.ratio"
    )
    assert "12 decoder blocks" in problem["detail"]


def test_a_config_nested_100000_deep_is_not_a_500(api_settings, rollback_sessionmaker, tiny_tokenizer):
    """Reading the depth of a hostile config.json must not end the request in a RecursionError: its depth
    is unknown at submission, so the job is accepted and the worker reports the model."""
    from tiny import save_tiny_llama

    directory = save_tiny_llama(api_settings.model_roots[0], "deep-config", tiny_tokenizer, num_hidden_layers=2)
    (directory / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    response = submit(api_settings, rollback_sessionmaker, str(directory), target={"num_layers": 1})
    assert response.status_code == 202, response.text


def test_an_s3_prefix_with_a_config(api_settings, rollback_sessionmaker, s3_server):
    bucket = f"lorp-{uuid.uuid4().hex[:12]}"
    create_bucket(s3_server, bucket)
    settings = api_settings.model_copy(
        update={
            "storage_url": f"s3://{bucket}/artifacts",
            "model_s3_prefixes": [f"s3://{bucket}/models/"],
            "s3_endpoint_url": s3_server,
            "s3_region": REGION,
            "s3_access_key": ACCESS_KEY,
            "s3_secret_key": SECRET_KEY,
        }
    )
    s3 = boto3.client(
        "s3", endpoint_url=s3_server, region_name=REGION, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY
    )
    config = {"model_type": "gpt2", "n_layer": 8, "architectures": ["GPT2LMHeadModel"]}
    s3.put_object(Bucket=bucket, Key="models/gpt/config.json", Body=json.dumps(config).encode())
    problem = assert_problem(
        submit(settings, rollback_sessionmaker, f"s3://{bucket}/models/gpt/", target={"num_layers": 7}),
        422,
        "target.num_layers",
    )
    assert "8 decoder blocks" in problem["detail"]
    assert submit(settings, rollback_sessionmaker, f"s3://{bucket}/models/gpt/").status_code == 202
    # No config.json there (a GGUF-only prefix, or nothing uploaded yet): the worker decides.
    response = submit(settings, rollback_sessionmaker, f"s3://{bucket}/models/none/", target={"num_layers": 99})
    assert response.status_code == 202, response.text


def _cache_hub_config(cache: Path, repo_id: str, config: dict[str, Any], commit: str = "a" * 40) -> None:
    """The Hugging Face cache layout as the hub client writes it: refs/main -> snapshots/<commit>/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))


def test_a_cached_hub_config_and_an_unknown_hub_model(api_settings, rollback_sessionmaker, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    _cache_hub_config(cache, "acme/deep-llama", {"model_type": "llama", "num_hidden_layers": 16})
    problem = assert_problem(
        submit(api_settings, rollback_sessionmaker, "acme/deep-llama", target={"num_layers": 15}),
        422,
        "target.num_layers",
    )
    assert "16 decoder blocks" in problem["detail"] and "<= 14" in problem["detail"]
    assert submit(api_settings, rollback_sessionmaker, "acme/deep-llama", target={"num_layers": 14}).status_code == 202
    # Never downloaded here: the depth is unknown at submission, so the worker checks after loading.
    response = submit(api_settings, rollback_sessionmaker, "acme/never-seen", target={"num_layers": 500})
    assert response.status_code == 202, response.text


def test_linear_healing_is_refused_at_submission_where_the_config_says_it_cannot_fold(
    api_settings, rollback_sessionmaker
):
    root = api_settings.model_roots[0]
    directory = root / "post-norm"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "gemma2", "num_hidden_layers": 6}))
    before = job_count(rollback_sessionmaker)
    problem = assert_problem(
        submit(api_settings, rollback_sessionmaker, str(directory), options={"heal": "linear"}), 422, "options.heal"
    )
    assert "post_feedforward_layernorm" in problem["detail"] and job_count(rollback_sessionmaker) == before
    problem = assert_problem(  # distillation starts from the linear maps
        submit(api_settings, rollback_sessionmaker, str(directory), options={"heal": "distill"}), 422, "options.heal"
    )
    assert "options.heal 'distill'" in problem["detail"] and job_count(rollback_sessionmaker) == before
    for options in ({"heal": "none"}, {}):  # unset: the worker heals where it can, here not at all
        response = submit(api_settings, rollback_sessionmaker, str(directory), options=options)
        assert response.status_code == 202, response.text


def test_linear_healing_is_refused_at_submission_for_a_checkpoint_stored_quantized(api_settings, rollback_sessionmaker):
    # A map folded into FP8 weights would have to be quantized again.
    root = api_settings.model_roots[0]
    config = {"model_type": "llama", "num_hidden_layers": 32, "quantization_config": {"quant_method": "fp8"}}
    (root / "llama-fp8").mkdir(parents=True)
    (root / "llama-fp8" / "config.json").write_text(json.dumps(config))
    before = job_count(rollback_sessionmaker)
    problem = assert_problem(
        submit(api_settings, rollback_sessionmaker, str(root / "llama-fp8"), options={"heal": "linear"}),
        422,
        "options.heal",
    )
    assert "quantized (fp8)" in problem["detail"] and job_count(rollback_sessionmaker) == before
    # gpt-oss as OpenAI ships it, experts in MXFP4, heals (the anchor's experts are written unquantized),
    # as do Mixtral and a Granite that scales its MLP output.
    plain = {
        "gpt-oss-mxfp4": {
            "model_type": "gpt_oss",
            "num_hidden_layers": 24,
            "quantization_config": {"quant_method": "mxfp4"},
        },
        "mixtral": {"model_type": "mixtral", "num_hidden_layers": 32},
        "granite": {"model_type": "granite", "num_hidden_layers": 40, "residual_multiplier": 0.22},
    }
    for name, config in plain.items():
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(config))
        response = submit(api_settings, rollback_sessionmaker, str(root / name), options={"heal": "linear"})
        assert response.status_code == 202, (name, response.text)


def test_sequential_execution_is_refused_where_it_cannot_give_what_the_job_asks(api_settings, rollback_sessionmaker):
    root = api_settings.model_roots[0]
    directory = root / "plain-llama"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 6}))
    before = job_count(rollback_sessionmaker)
    sequential = {"execution": "sequential"}
    tasks = {"tasks": [{"name": "lorp_cloze", "limit": 4}]}
    problem = assert_problem(
        submit(api_settings, rollback_sessionmaker, str(directory), options=sequential, evaluation=tasks),
        422,
        "evaluation.tasks",
    )
    assert "options.execution 'sequential'" in problem["detail"]
    gguf = str(root / "model.gguf")
    assert_problem(submit(api_settings, rollback_sessionmaker, gguf, options=sequential), 422, "options.execution")
    assert_problem(
        submit(api_settings, rollback_sessionmaker, str(directory), options={"execution": "lazy"}),
        422,
        "options.execution",
    )
    for options, field in (
        ({"heal": "linear", "heal_steps": 4}, "options.heal_steps"),
        ({"heal": "distill", "heal_steps": -1}, "options.heal_steps"),
        ({"heal": "distil"}, "options.heal"),
    ):
        assert_problem(submit(api_settings, rollback_sessionmaker, str(directory), options=options), 422, field)
    for options, evaluation in (  # a curve drawn distilled needs a distilling job, and a curve
        ({"heal": "linear"}, {"curve_distill": True}),
        ({}, {"curve_distill": True}),
        ({"heal": "distill"}, {"curve_distill": True, "curve_budgets": []}),
    ):
        problem = assert_problem(
            submit(api_settings, rollback_sessionmaker, str(directory), options=options, evaluation=evaluation),
            422,
            "evaluation.curve_distill",
        )
        assert "curve" in problem["detail"]
    assert job_count(rollback_sessionmaker) == before
    evaluation = {"curve_distill": True, "curve_budgets": [1, 2]}
    response = submit(
        api_settings, rollback_sessionmaker, str(directory), options={"heal": "distill"}, evaluation=evaluation
    )
    assert response.status_code == 202, response.text
    response = submit(api_settings, rollback_sessionmaker, str(directory), options={"heal": "distill", "heal_steps": 0})
    assert response.status_code == 202, response.text
    # Sequential without tasks is accepted (speed and completions are skipped, and the summary says so).
    response = submit(api_settings, rollback_sessionmaker, str(directory), options=sequential)
    assert response.status_code == 202, response.text
