"""The benchmark workload: seeded, in the demo model's prompt distribution, mixes as named."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.workload import (
    MAX_PROMPT_CHARS,
    WORDS,
    WorkloadConfig,
    adapter_weights,
    build_workload,
)

ADAPTERS = ("reverse", "upper", "title")


def test_same_seed_same_requests_and_ids_follow_the_prefix() -> None:
    config = WorkloadConfig(num_requests=50, seed=7, id_prefix="cell")
    first = build_workload(config, ADAPTERS)
    again = build_workload(config, ADAPTERS)
    assert first == again
    assert [s.request_id for s in first[:2]] == ["cell-00000", "cell-00001"]
    other = build_workload(WorkloadConfig(num_requests=50, seed=8), ADAPTERS)
    assert [s.prompt for s in other] != [s.prompt for s in first]


def test_prompts_are_lowercase_known_words_within_the_training_length() -> None:
    specs = build_workload(WorkloadConfig(num_requests=300, seed=1), ADAPTERS)
    for spec in specs:
        assert 0 < len(spec.prompt) <= MAX_PROMPT_CHARS
        assert spec.prompt == spec.prompt.lower()
        assert all(word in WORDS for word in spec.prompt.split(" "))
        assert 1 <= len(spec.prompt.split(" ")) <= 6


def test_output_lengths_stay_in_range_and_vary() -> None:
    config = WorkloadConfig(num_requests=200, min_output_tokens=5, max_output_tokens=9)
    lengths = {s.output_tokens for s in build_workload(config, ADAPTERS)}
    assert lengths == {5, 6, 7, 8, 9}


def test_mixes() -> None:
    assert adapter_weights("base", ADAPTERS) == {"": 1.0}
    assert adapter_weights("single", ADAPTERS) == {"reverse": 1.0}
    assert adapter_weights("uniform", ADAPTERS) == pytest.approx(dict.fromkeys(ADAPTERS, 1 / 3))
    skewed = adapter_weights("skewed", ADAPTERS)
    assert skewed["reverse"] > skewed["upper"] > skewed["title"]
    assert sum(skewed.values()) == pytest.approx(1.0)
    mixable = adapter_weights("mixable", ADAPTERS, mixable=("reverse", "upper"))
    assert mixable == pytest.approx({"reverse": 0.5, "upper": 0.5})
    # Without adapters every mix degrades to the base model rather than failing.
    assert adapter_weights("uniform", ()) == {"": 1.0}
    with pytest.raises(ValueError):
        adapter_weights("zipf", ADAPTERS)


def test_uniform_mix_draws_every_adapter() -> None:
    specs = build_workload(WorkloadConfig(num_requests=300, adapter_mix="uniform"), ADAPTERS)
    counts = Counter(s.adapter for s in specs)
    assert set(counts) == set(ADAPTERS)
    assert min(counts.values()) > 60


def test_bad_length_range_is_rejected() -> None:
    with pytest.raises(ValueError):
        build_workload(WorkloadConfig(num_requests=1, min_output_tokens=4, max_output_tokens=3), ())


def test_natural_workload_keeps_prompts_and_adapters_but_caps_instead_of_fixing_lengths() -> None:
    exact = build_workload(WorkloadConfig(num_requests=40, seed=3), ADAPTERS)
    natural = build_workload(WorkloadConfig(num_requests=40, seed=3, natural=True), ADAPTERS)
    assert [(s.prompt, s.adapter) for s in natural] == [(s.prompt, s.adapter) for s in exact]
    assert all(s.output_tokens == 48 and not s.exact_length for s in natural)
    assert all(s.exact_length for s in exact)
    beams = build_workload(WorkloadConfig(num_requests=3, num_beams=4), ADAPTERS)
    assert all(s.num_beams == 4 for s in beams)
