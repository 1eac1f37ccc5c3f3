"""Seeded request workloads: prompts, output lengths and adapter mixes.

Prompts are lowercase sentences of 1-6 words (at most 40 characters), the distribution the demo
model was trained on, so the adapters run on in-distribution input. Output lengths are fixed per
request by sending ``min_new_tokens == max_new_tokens``: every system under test then generates
exactly the same number of tokens for the same request (an "ignore EOS" benchmark), which is
what makes tokens/s comparable across baselines.

A *natural* workload (``natural=True``) sends only a ``max_new_tokens`` cap: each request ends
at EOS, as real traffic does, so rows of one batch finish at different steps (the demo adapters
answer in 4-31 tokens). Greedy decoding keeps it deterministic: every system still generates
the same tokens for the same request, just not equally many per request.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ADAPTER_MIXES",
    "WORDS",
    "RequestSpec",
    "WorkloadConfig",
    "adapter_weights",
    "build_workload",
    "make_prompt",
]

# Words the demo model saw in training (scripts/train_demo.py's common words); the training set
# also had generated pseudo-words, but any lowercase words are in-distribution for copying.
_WORDS_TEXT = (
    "the quick brown fox jumps over lazy dog a an and or but if then else when where what who "
    "how why is are was were be been have has had do does did will would can could should may "
    "might must shall not no yes all any some many much more most few less least one two "
    "three four five six seven eight nine ten red green blue black white yellow cat bird fish "
    "tree house car road river sea sky sun moon star day night time year good bad big small "
    "old new long short hot cold fast slow happy sad light dark water fire earth wind stone "
    "paper book word world hello peft serve model adapter token server client"
)
WORDS: tuple[str, ...] = tuple(_WORDS_TEXT.split())
MAX_PROMPT_CHARS = 40
MAX_WORDS = 6

# base: no adapter; single: every request the first adapter; uniform: all adapters equally;
# skewed: Zipf(1) over adapters (a few hot, a long tail); mixable: uniform over the adapters
# the server can mix in one batch (plain LoRA), to separate mixing cost from batch splitting.
ADAPTER_MIXES: tuple[str, ...] = ("base", "single", "uniform", "skewed", "mixable")


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload; ``adapter == ""`` is the base model."""

    index: int
    request_id: str
    prompt: str
    adapter: str
    # Exact number of tokens to generate (sent as both min_new_tokens and max_new_tokens); for a
    # natural-length request only the cap (max_new_tokens), the request ends at EOS.
    output_tokens: int
    exact_length: bool = True
    num_beams: int = 1  # > 1: beam search (always a unary Generate)


@dataclass(frozen=True)
class WorkloadConfig:
    """What to draw; the same config and seed always give the same requests."""

    num_requests: int
    adapter_mix: str = "uniform"
    min_output_tokens: int = 16
    max_output_tokens: int = 48
    min_words: int = 1
    max_words: int = MAX_WORDS
    seed: int = 0
    # Distinguishes request ids of different cells so server log lines join unambiguously.
    id_prefix: str = "bench"
    # Natural lengths: no min_new_tokens, every request capped at max_output_tokens, ends at EOS.
    natural: bool = False
    num_beams: int = 1


def make_prompt(rng: random.Random, min_words: int = 1, max_words: int = MAX_WORDS) -> str:
    """A lowercase sentence of ``min_words..max_words`` words, trimmed to 40 characters."""
    picked = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
    # Dropping whole words (rather than cutting one) keeps every word a real word.
    while len(picked) > 1 and len(" ".join(picked)) > MAX_PROMPT_CHARS:
        picked.pop()
    return " ".join(picked)[:MAX_PROMPT_CHARS]


def adapter_weights(
    mix: str, adapters: Sequence[str], mixable: Sequence[str] = ()
) -> dict[str, float]:
    """Probability of each adapter name ("" = base) under ``mix``.

    ``adapters`` is the server's adapter list in a stable order; "single" and "skewed" favour
    its first entries, so the caller decides which adapter is hot by ordering the list.
    """
    if mix not in ADAPTER_MIXES:
        raise ValueError(f"adapter mix must be one of {ADAPTER_MIXES}, got {mix!r}")
    if mix == "base" or not adapters:
        return {"": 1.0}
    if mix == "single":
        return {adapters[0]: 1.0}
    if mix == "skewed":
        raw = {name: 1.0 / (rank + 1) for rank, name in enumerate(adapters)}
    elif mix == "mixable":
        names = [a for a in adapters if a in set(mixable)] or [adapters[0]]
        raw = dict.fromkeys(names, 1.0)
    else:
        raw = dict.fromkeys(adapters, 1.0)
    total = sum(raw.values())
    return {name: weight / total for name, weight in raw.items()}


def build_workload(
    config: WorkloadConfig, adapters: Sequence[str], mixable: Sequence[str] = ()
) -> list[RequestSpec]:
    """Draw ``config.num_requests`` requests from one seeded RNG."""
    if config.min_output_tokens < 1 or config.max_output_tokens < config.min_output_tokens:
        raise ValueError("need 1 <= min_output_tokens <= max_output_tokens")
    rng = random.Random(config.seed)
    weights = adapter_weights(config.adapter_mix, adapters, mixable)
    names = list(weights)
    probabilities = [weights[n] for n in names]
    specs: list[RequestSpec] = []
    for i in range(config.num_requests):
        prompt = make_prompt(rng, config.min_words, config.max_words)
        adapter = rng.choices(names, probabilities)[0]
        # Drawn even for natural requests, so both kinds share their prompts and adapters.
        output_tokens = rng.randint(config.min_output_tokens, config.max_output_tokens)
        specs.append(
            RequestSpec(
                index=i,
                request_id=f"{config.id_prefix}-{i:05d}",
                prompt=prompt,
                adapter=adapter,
                output_tokens=config.max_output_tokens if config.natural else output_tokens,
                exact_length=not config.natural,
                num_beams=config.num_beams,
            )
        )
    return specs
