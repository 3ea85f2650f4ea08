"""Prometheus exposition parsing and the mapping of each engine dialect to one EngineLoad."""

from __future__ import annotations

import math

import pytest

from gateway.live.engine_load import WANTED, EngineLoad, Fold, engine_load, parse_prometheus

SWITCHBOARD = """\
# HELP switchboard_engine_requests_total Chat requests by outcome
# TYPE switchboard_engine_requests_total counter
switchboard_engine_requests_total{outcome="ok"} 12.0
switchboard_engine_requests_total{outcome="cancelled"} 1.0
# HELP switchboard_engine_queue_depth Requests waiting for the worker
# TYPE switchboard_engine_queue_depth gauge
switchboard_engine_queue_depth 4.0
# HELP switchboard_engine_running_requests Requests being generated
# TYPE switchboard_engine_running_requests gauge
switchboard_engine_running_requests 2.0
"""

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 5.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.625
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 42.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 42.0
"""

VLLM_V0 = """\
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.5
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 2
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 9
"""

LLAMACPP = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 1234
# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio 0.0625
# HELP llamacpp:requests_processing Number of request processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
# HELP llamacpp:requests_deferred Number of request deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 6
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SWITCHBOARD, EngineLoad(queue_depth=4, running=2, kv_cache_used_frac=None)),
        (VLLM, EngineLoad(queue_depth=3, running=12, kv_cache_used_frac=0.625)),
        (VLLM_V0, EngineLoad(queue_depth=2, running=9, kv_cache_used_frac=0.5)),
        (LLAMACPP, EngineLoad(queue_depth=6, running=1, kv_cache_used_frac=0.0625)),
        ("", EngineLoad(queue_depth=None, running=None, kv_cache_used_frac=None)),
    ],
    ids=["switchboard", "vllm", "vllm-v0", "llamacpp", "empty"],
)
def test_each_dialect_maps_to_engine_load(text: str, expected: EngineLoad) -> None:
    assert engine_load(parse_prometheus(text)) == expected


def test_parser_keeps_only_wanted_metrics_and_folds_label_sets() -> None:
    values = parse_prometheus(VLLM)
    assert values == {
        "vllm:num_requests_running": 12.0,  # summed across engines
        "vllm:num_requests_waiting": 3.0,
        "vllm:kv_cache_usage_perc": 0.625,  # max across engines
    }


def test_parser_handles_labels_timestamps_inf_and_nan() -> None:
    text = """\
# a comment with } and { in it
weird{path="/a b}c",quote="say \\"hi\\" }",le="+Inf"} 3 1712345678000
weird 4
spaced   {a="1"}   5
inf_value +Inf
neg_inf{x="y"} -Inf
nan_value NaN
nan_then_real{i="0"} NaN
nan_then_real{i="1"} 2.5
broken{unclosed="x 9
no_value
bad_value abc
"""
    wanted = {name: Fold.SUM for name in ("weird", "inf_value", "neg_inf", "nan_value", "nan_then_real")}
    values = parse_prometheus(text, wanted)
    assert values["weird"] == 7.0
    assert values["inf_value"] == math.inf and values["neg_inf"] == -math.inf
    assert "nan_value" not in values
    assert values["nan_then_real"] == 2.5
    assert set(values) == {"weird", "inf_value", "neg_inf", "nan_then_real"}


def test_engine_load_drops_non_finite_and_clamps() -> None:
    load = engine_load(
        {
            "vllm:num_requests_waiting": math.inf,
            "vllm:num_requests_running": -3.0,
            "vllm:kv_cache_usage_perc": 1.7,
        }
    )
    assert load == EngineLoad(queue_depth=None, running=0, kv_cache_used_frac=1.0)


def test_first_dialect_listed_wins_when_several_are_present() -> None:
    load = engine_load(parse_prometheus(VLLM_V0 + "vllm:kv_cache_usage_perc 0.75\n" + SWITCHBOARD))
    assert load == EngineLoad(queue_depth=4, running=2, kv_cache_used_frac=0.75)


# Written out by hand, not derived from `WANTED`: the names each engine publishes (our engine's in
# backends/local/metrics.py, vLLM's and llama.cpp server's in their docs) and how several series of one
# name combine. Renaming or dropping one in gateway/live/engine_load.py must fail here.
EXPECTED_WANTED = {
    "switchboard_engine_queue_depth": Fold.SUM,
    "switchboard_engine_running_requests": Fold.SUM,
    "switchboard_engine_kv_cache_usage_ratio": Fold.MAX,
    "vllm:num_requests_waiting": Fold.SUM,
    "vllm:num_requests_running": Fold.SUM,
    "vllm:kv_cache_usage_perc": Fold.MAX,
    "vllm:gpu_cache_usage_perc": Fold.MAX,  # vLLM v0's name for the same gauge
    "llamacpp:requests_deferred": Fold.SUM,
    "llamacpp:requests_processing": Fold.SUM,
    "llamacpp:kv_cache_usage_ratio": Fold.MAX,
}


def test_the_reader_wants_exactly_the_published_metric_names() -> None:
    assert dict(WANTED) == EXPECTED_WANTED


@pytest.mark.parametrize("name", sorted(EXPECTED_WANTED))
def test_each_published_name_is_parsed(name: str) -> None:
    """A sample under each name survives parsing (with the default `wanted`), labels or not."""
    text = f'# TYPE {name} gauge\n{name}{{model_name="m"}} 0.5\n{name}{{model_name="n"}} 0.25\n'
    expected = 0.75 if EXPECTED_WANTED[name] is Fold.SUM else 0.5
    assert parse_prometheus(text) == {name: expected}
