"""Batched processors give every row exactly the logits its own processors give it alone.

Rows of random configurations (penalties, n-gram bans, bad words and biases of one and of
several tokens, min tokens, temperature, top-k/p, min-p, typical-p, epsilon) share one block
of random logits with ties; for several steps, every row's processed logits from the batched
path must be ``torch.equal`` to transformers' own processors run on that row alone, and the
sampler's tokens (greedy and seeded) must be the ones the per-row logits give.
"""

from __future__ import annotations

import gc
import random
import weakref
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from peftserve.server.engine.processors import BatchedProcessors, row_plan
from peftserve.server.engine.rows import Row, RowFactory
from peftserve.server.engine.sampler import Sampler
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LogitsProcessorList

EOS = 2
CPU = torch.device("cpu")


def _base(vocab: int) -> Any:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(config).eval()


def _config(rng: random.Random, vocab: int) -> GenerationConfig:
    """A random request configuration, every processor the engine can build now and then."""
    c: dict[str, Any] = {"eos_token_id": EOS, "pad_token_id": 0}

    def word() -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(rng.choice([1, 1, 2, 3]))]

    if rng.random() < 0.4:
        c["repetition_penalty"] = rng.choice([1.3, 0.7, 2.0])
    if rng.random() < 0.15:
        c["no_repeat_ngram_size"] = rng.choice([2, 3])
    if rng.random() < 0.3:
        c["bad_words_ids"] = [word() for _ in range(rng.randrange(1, 4))]
    if rng.random() < 0.3:
        c["sequence_bias"] = [[word(), rng.choice([-3.0, 2.5, 7.0])] for _ in range(2)]
    if rng.random() < 0.5:
        c["min_new_tokens"] = rng.randrange(0, 6)
    if rng.random() < 0.6:
        c["do_sample"] = True
        c["temperature"] = rng.choice([1.0, 0.7, 1.3, 3.0])
        c["top_k"] = rng.choice([0, 5, 40])
        c["top_p"] = rng.choice([1.0, 0.9, 0.5])
        if rng.random() < 0.3:
            c["min_p"] = rng.choice([0.0, 0.05, 0.2])
        if rng.random() < 0.2:
            c["typical_p"] = rng.choice([0.9, 0.5])
        if rng.random() < 0.1:
            c["epsilon_cutoff"] = 3e-4
    else:
        c.update(do_sample=False, top_k=None, top_p=None, temperature=None)
    return GenerationConfig(**c)


def _rows(rng: random.Random, base: Any, vocab: int, n: int) -> list[Row]:
    factory = RowFactory(base, cast(Any, None), CPU, (EOS,))
    rows = []
    for i in range(n):
        config = _config(rng, vocab)
        prompt = tuple(rng.randrange(3, vocab) for _ in range(rng.randrange(1, 12)))
        job = SimpleNamespace(prepared=SimpleNamespace(generation_config=config, prompt_ids=prompt))
        generator = None
        if config.do_sample:
            generator = torch.Generator().manual_seed(1000 + i)
        rows.append(
            Row(
                job=cast(Any, None),
                index=0,
                prompt=prompt,
                processors=LogitsProcessorList(factory.processors(cast(Any, job))),
                generator=generator,
                max_new_tokens=32,
                eos_ids=frozenset({EOS}),
                stream=cast(Any, None),
                logprobs_top_n=None,
            )
        )
    return rows


def _logits(gen: torch.Generator, n: int, vocab: int) -> torch.Tensor:
    # Rounded: many exact ties, where sorting and top-k could tell a batch from a row.
    return (torch.randn((n, vocab), generator=gen) * 4).round(decimals=1)


def _alone(row: Row, logits: torch.Tensor) -> torch.Tensor:
    return row.processors(row.history(CPU), logits.unsqueeze(0).clone())[0]  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(6))
def test_batched_processors_equal_each_rows_own(seed: int) -> None:
    rng = random.Random(seed)
    vocab = 300
    base = _base(vocab)
    rows = _rows(rng, base, vocab, 24)
    batched = BatchedProcessors(CPU)
    gen = torch.Generator().manual_seed(seed)
    assert sum(row_plan(r).steps is not None for r in rows) > len(rows) // 2
    for _ in range(8):
        logits = _logits(gen, len(rows), vocab)
        members = [i for i, r in enumerate(rows) if row_plan(r).steps is not None]
        scores = logits.clone()
        scores = batched.apply(scores, rows, members)
        for i in members:
            assert torch.equal(scores[i], _alone(rows[i], logits[i])), (i, rows[i].processors)
        for row in rows:  # every row gets a token; some are banned ids, some repeat
            row.tokens.append(rng.choice([rng.randrange(3, vocab), *row.prompt]))


def test_subsets_of_rows_and_rows_that_leave_keep_their_own_history() -> None:
    """Rows come and go between steps (their slots of seen ids are reused, the table grows,
    a row's ids outgrow the table's width): each step's rows still get their own logits."""
    rng = random.Random(7)
    vocab = 120
    base = _base(vocab)
    pool = _rows(rng, base, vocab, 30)
    batched = BatchedProcessors(CPU)
    gen = torch.Generator().manual_seed(7)
    for step in range(40):
        if step % 5 == 4:
            pool += _rows(rng, base, vocab, 6)  # arrivals, into slots of rows that left
        rows = [r for r in pool if r.finish_reason is None and rng.random() < 0.7]
        logits = _logits(gen, len(rows), vocab)
        members = [i for i, r in enumerate(rows) if row_plan(r).steps is not None]
        scores = logits.clone()
        scores = batched.apply(scores, rows, members)
        for i in members:
            assert torch.equal(scores[i], _alone(rows[i], logits[i]))
        for row in rows:
            row.tokens.extend(rng.randrange(3, vocab) for _ in range(rng.choice([1, 1, 9])))
            if rng.random() < 0.1:
                row.finish_reason = cast(Any, "done")  # leaves; its slot may be reused
    seen = batched.seen
    assert seen.ids.shape[1] > 64, "a row's ids outgrew the first width"
    assert len(seen._owners) < len(pool), "slots of rows that left were reused"


def test_more_threads_and_a_large_vocabulary() -> None:
    """Batched reductions per row must not change with several threads (reductions over one
    long row may then be split between threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rng = random.Random(11)
        vocab = 70000
        base = _base(vocab)
        rows = _rows(rng, base, vocab, 6)
        batched = BatchedProcessors(CPU)
        logits = _logits(torch.Generator().manual_seed(11), len(rows), vocab)
        members = [i for i, r in enumerate(rows) if row_plan(r).steps is not None]
        scores = logits.clone()
        scores = batched.apply(scores, rows, members)
        for i in members:
            assert torch.equal(scores[i], _alone(rows[i], logits[i]))
    finally:
        torch.set_num_threads(threads)


def test_sampler_tokens_equal_per_row_processing() -> None:
    """The whole choice (greedy argmax, seeded exponential race) over batched processors gives
    each row the token its own processors and its own generator give it alone; rows with a
    processor the batched path does not know run theirs alone, next to the batched ones."""
    rng = random.Random(3)
    vocab = 300
    base = _base(vocab)
    rows = _rows(rng, base, vocab, 32)
    twins = _rows(random.Random(3), base, vocab, 32)  # same configs, fresh generators
    for i in (0, 7, 19):  # extra processors after transformers' own: these rows run alone
        rows[i].processors.append(_Boost())
        twins[i].processors.append(_Boost())
    assert [i for i, r in enumerate(rows) if row_plan(r).steps is None] == [0, 7, 19]
    sampler = Sampler(CPU, str)
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        logits = _logits(gen, len(rows), vocab)
        got = sampler.choose(logits, rows).token_ids
        for i, twin in enumerate(twins):
            scores = _alone(twin, logits[i]) if len(twin.processors) else logits[i]
            if twin.generator is not None:
                noise = torch.empty_like(scores).exponential_(generator=twin.generator)
                want = int((scores.softmax(-1) / noise.clamp_min(1.1754943508222875e-38)).argmax())
            else:
                want = int(scores.argmax())
            assert got[i] == want, i
        for row, twin, token in zip(rows, twins, got, strict=True):
            row.tokens.append(token)
            twin.tokens.append(token)


class _Boost:
    """A processor transformers does not know: the sampler must run its row alone."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_add(1, torch.tensor([5]), torch.full((scores.shape[0], 1), 9.0))


def test_a_row_whose_processors_change_mid_flight_is_planned_again() -> None:
    """The grouping is kept while the batch stays the same; a row whose list grows (an extra
    processor) is planned again and runs alone from then on, the others stay exact."""
    rng = random.Random(13)
    vocab = 200
    rows = _rows(rng, _base(vocab), vocab, 12)
    sampler = Sampler(CPU, str)
    gen = torch.Generator().manual_seed(13)
    grown = next(i for i, r in enumerate(rows) if row_plan(r).steps and not r.samples)
    for step in range(5):
        if step == 2:
            rows[grown].processors.append(_Boost())
        logits = _logits(gen, len(rows), vocab)
        got = sampler.choose(logits, rows).token_ids
        want = int(_alone(rows[grown], logits[grown]).argmax())
        assert got[grown] == want
        assert (row_plan(rows[grown]).steps is None) == (step >= 2)
        for row, token in zip(rows, got, strict=True):
            row.tokens.append(token)


def test_repetition_penalty_drops_ids_beyond_the_logits_as_transformers_does() -> None:
    """Ids the logits do not cover (a tokenizer larger than the head) are not penalised; a
    row with no id within them is left as the processor leaves it."""
    factory = RowFactory(_base(80), cast(Any, None), CPU, (EOS,))
    config = GenerationConfig(eos_token_id=EOS, pad_token_id=0, repetition_penalty=1.7)
    prompts = [(3, 55, 70, 4), (60, 79), (9, 9, 64)]  # the logits cover ids < 50
    rows = []
    for prompt in prompts:
        job = SimpleNamespace(prepared=SimpleNamespace(generation_config=config, prompt_ids=prompt))
        processors = LogitsProcessorList(factory.processors(cast(Any, job)))
        rows.append(
            Row(
                cast(Any, None),
                0,
                prompt,
                processors,
                None,
                8,
                frozenset({EOS}),
                cast(Any, None),
                None,
            )
        )
    batched = BatchedProcessors(CPU)
    logits = _logits(torch.Generator().manual_seed(1), len(rows), 50)
    for members in ([0, 2], [0, 1, 2]):
        scores = logits.clone()
        scores = batched.apply(scores, rows, members)
        for i in members:
            assert torch.equal(scores[i], _alone(rows[i], logits[i]))
        assert not torch.equal(scores[0], logits[0])


def test_the_sampler_keeps_no_row_alive() -> None:
    """Penalised rows that are gone (not only finished) give their slots back: the batched
    processors hold them weakly."""
    rng = random.Random(17)
    vocab = 90
    base = _base(vocab)
    batched = BatchedProcessors(CPU)
    config = GenerationConfig(eos_token_id=EOS, pad_token_id=0, repetition_penalty=1.2)
    factory = RowFactory(base, cast(Any, None), CPU, (EOS,))

    def penalised(n: int) -> list[Row]:
        out = []
        for _ in range(n):
            prompt = tuple(rng.randrange(3, vocab) for _ in range(5))
            prepared = SimpleNamespace(generation_config=config, prompt_ids=prompt)
            processors = LogitsProcessorList(
                factory.processors(cast(Any, SimpleNamespace(prepared=prepared)))
            )
            out.append(
                Row(
                    cast(Any, None),
                    0,
                    prompt,
                    processors,
                    None,
                    8,
                    frozenset(),
                    cast(Any, None),
                    None,
                )
            )
        return out

    rows = penalised(8)
    batched.apply(torch.zeros((8, vocab)), rows, list(range(8)))
    refs = [weakref.ref(r) for r in rows]
    del rows
    gc.collect()
    assert all(ref() is None for ref in refs)
    again = penalised(8)
    logits = _logits(torch.Generator().manual_seed(17), 8, vocab)
    scores = batched.apply(logits.clone(), again, list(range(8)))
    assert len(batched.seen._owners) == 8, "the slots of the rows that are gone were reused"
    for i, row in enumerate(again):
        assert torch.equal(scores[i], _alone(row, logits[i]))


@pytest.mark.parametrize("sample", [False, True])
def test_rows_that_all_agree_run_as_one_block(sample: bool) -> None:
    """Every row with the same configuration (the benchmark's case): each operation covers
    the whole block (no selection, a warper's result becomes the scores), still exact."""
    vocab = 150
    base = _base(vocab)
    factory = RowFactory(base, cast(Any, None), CPU, (EOS,))
    settings: dict[str, Any] = {"min_new_tokens": 4, "repetition_penalty": 1.3}
    if sample:
        settings.update(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05)
    config = GenerationConfig(eos_token_id=EOS, pad_token_id=0, bad_words_ids=[[9]], **settings)
    rng = random.Random(19)
    rows = []
    twins = []  # their generators, for the expected draws
    for i in range(16):
        prompt = tuple(rng.randrange(3, vocab) for _ in range(rng.randrange(1, 9)))
        prepared = SimpleNamespace(generation_config=config, prompt_ids=prompt)
        processors = LogitsProcessorList(
            factory.processors(cast(Any, SimpleNamespace(prepared=prepared)))
        )
        generator = torch.Generator().manual_seed(i) if sample else None
        twins.append(torch.Generator().manual_seed(i))
        rows.append(
            Row(
                cast(Any, None),
                0,
                prompt,
                processors,
                generator,
                8,
                frozenset(),
                cast(Any, None),
                None,
            )
        )
    batched = BatchedProcessors(CPU)
    sampler = Sampler(CPU, str)  # its own batched processors over the same rows
    gen = torch.Generator().manual_seed(19)
    for _ in range(6):
        logits = _logits(gen, len(rows), vocab)
        scores = batched.apply(logits.clone(), rows, list(range(len(rows))))
        assert all(g.index is None for g in batched._layout if g.thresholds is None)
        alone = [_alone(row, logits[i]) for i, row in enumerate(rows)]
        for i in range(len(rows)):
            assert torch.equal(scores[i], alone[i])
        tokens = sampler.choose(logits, rows).token_ids
        if sample:
            want = [
                int((a.softmax(-1) / torch.empty_like(a).exponential_(generator=g)).argmax())
                for a, g in zip(alone, twins, strict=True)
            ]
        else:
            want = [int(a.argmax()) for a in alone]
        assert tokens == want
        for row, token in zip(rows, tokens, strict=True):
            row.tokens.append(token)
