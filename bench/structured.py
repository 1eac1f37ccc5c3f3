"""Structured-output cell: constrained vs unconstrained throughput, and constraint compile times.

Throughput: one peftserve server (subprocess on 127.0.0.1, demo model), closed-loop clients at
16 and 64 concurrent. Each round runs the same prompts twice, back to back (the order
alternates between rounds): once all unconstrained, once "mixed" (every other request carries
a constraint: two JSON schemas, a regex and a Lark grammar, in turn). Every row generates
exactly max_new_tokens tokens (unconstrained rows by min_new_tokens, constrained ones because
their constraints cannot complete sooner), so both runs do the same model work and the ratio
isolates what the constraints cost. The figure is generated tokens per second; the ratio is
mixed / unconstrained per round, the median over rounds is reported (target >= 0.8).

Compile time: ``ConstraintCompiler`` (the server's own, cache off) on the test suites'
constraints plus generated JSON schemas like the property test's, each compiled once fresh:
p50 and p99 over all of them.

    python -m bench.structured [--out bench/results] [--rounds 4] [--waves 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cells import process_cpu_s
from .servers import ServerProcess, child_env, peftserve_command

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "models" / "demo"
CLIENTS = (16, 64)
MAX_NEW_TOKENS = 32
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "river",
    "stone",
    "light",
    "cloud",
]

SCHEMA_ANIMAL = {
    "type": "object",
    "properties": {
        "animal": {"enum": ["fox", "dog", "cat"]},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8},
    },
    "required": ["animal", "legs"],
    "additionalProperties": False,
}
SCHEMA_PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "kind": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "kind"],
    "additionalProperties": False,
}
SCHEMA_NOTE = {
    "type": "object",
    "properties": {"note": {"type": "string", "minLength": 64}},
    "required": ["note"],
}
SCHEMA_LIST = {"type": "array", "items": {"type": "string", "minLength": 64}, "minItems": 1}
# The constraints the mixed workload cycles through (client keyword arguments): none can be
# complete within MAX_NEW_TOKENS, so every constrained row runs its full length.
MIXED_CONSTRAINTS: tuple[dict[str, Any], ...] = (
    {"json_schema": SCHEMA_NOTE},
    {"regex": "[a-z ]{64,}"},
    {"grammar": 'start: "<" /[a-z ]{64,}/ ">"'},
    {"json_schema": SCHEMA_LIST},
)


def prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) for _ in range(count)]


async def run_load(
    address: str, clients: int, texts: Sequence[str], mixed: bool, server_pid: int
) -> tuple[float, int, int, float]:
    """(wall seconds, generated tokens, failed requests, server CPU seconds) for one
    closed-loop run."""
    from peftserve.client import AsyncPeftServeClient, PeftServeClientError

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(texts)):
        queue.put_nowait(i)
    tokens = failures = 0
    async with AsyncPeftServeClient(address, timeout_s=600) as client:

        async def caller() -> None:
            nonlocal tokens, failures
            while not queue.empty():
                i = queue.get_nowait()
                options: dict[str, Any] = {
                    "max_new_tokens": MAX_NEW_TOKENS,
                    "min_new_tokens": MAX_NEW_TOKENS,
                    "do_sample": False,
                }
                if mixed and i % 2 == 1:
                    options.update(MIXED_CONSTRAINTS[(i // 2) % len(MIXED_CONSTRAINTS)])
                try:
                    out = await client.generate(texts[i], **options)
                    tokens += out.completion_tokens
                except PeftServeClientError:
                    failures += 1

        await client.generate("warm up", max_new_tokens=2)
        cpu_start = process_cpu_s(server_pid) or 0.0
        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(clients)))
        wall = time.perf_counter() - start
        return wall, tokens, failures, (process_cpu_s(server_pid) or 0.0) - cpu_start


def throughput(rounds: int, waves: int, out_dir: Path) -> list[dict[str, Any]]:
    command = peftserve_command(DEMO / "base", DEMO / "adapters", max_batch_size=64)
    server = ServerProcess(
        "peftserve-structured", command, child_env(1), out_dir / "structured-server.log"
    )
    cells: list[dict[str, Any]] = []
    with server:
        address = server.start()
        pid = server.pid
        for clients in CLIENTS:
            ratios, cpu_ratios, runs = [], [], []
            requests = waves * clients
            for r in range(rounds):
                texts = prompts(requests, seed=1000 * clients + r)
                if r % 2 == 0:
                    plain = asyncio.run(run_load(address, clients, texts, False, pid))
                    mixed = asyncio.run(run_load(address, clients, texts, True, pid))
                else:
                    mixed = asyncio.run(run_load(address, clients, texts, True, pid))
                    plain = asyncio.run(run_load(address, clients, texts, False, pid))
                plain_tps, mixed_tps = plain[1] / plain[0], mixed[1] / mixed[0]
                plain_cpu, mixed_cpu = plain[1] / plain[3], mixed[1] / mixed[3]
                ratios.append(mixed_tps / plain_tps)
                cpu_ratios.append(mixed_cpu / plain_cpu)
                runs.append(
                    {
                        "unconstrained_tokens_per_s": round(plain_tps, 1),
                        "mixed_tokens_per_s": round(mixed_tps, 1),
                        "unconstrained_tokens_per_server_cpu_s": round(plain_cpu, 1),
                        "mixed_tokens_per_server_cpu_s": round(mixed_cpu, 1),
                        "unconstrained_tokens": plain[1],
                        "mixed_tokens": mixed[1],
                        "failures": plain[2] + mixed[2],
                    }
                )
                print(
                    f"clients={clients} round={r}: {runs[-1]} ratio={ratios[-1]:.3f} "
                    f"cpu_ratio={cpu_ratios[-1]:.3f}"
                )
            cells.append(
                {
                    "clients": clients,
                    "requests": requests,
                    "max_new_tokens": MAX_NEW_TOKENS,
                    "rounds": runs,
                    "ratio_median": round(statistics.median(ratios), 3),
                    "cpu_ratio_median": round(statistics.median(cpu_ratios), 3),
                    "target": 0.8,
                    "met": statistics.median(ratios) >= 0.8,
                    "cpu_met": statistics.median(cpu_ratios) >= 0.8,
                }
            )
    return cells


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    leaves: list[dict[str, Any]] = [
        {"type": "string", "maxLength": rng.randint(1, 20)},
        {"type": "integer", "minimum": 0, "maximum": rng.randint(1, 10**6)},
        {"type": "boolean"},
        {"enum": rng.sample(WORDS, rng.randint(1, 4))},
        {"type": "string", "pattern": f"[a-z]{{1,{rng.randint(1, 9)}}}"},
    ]
    props: dict[str, Any] = {}
    for i in range(rng.randint(1, 8)):
        if depth < 2 and rng.random() < 0.2:
            props[f"k{i}"] = random_schema(rng, depth + 1)
        elif rng.random() < 0.2:
            props[f"k{i}"] = {"type": "array", "items": rng.choice(leaves), "maxItems": 4}
        else:
            props[f"k{i}"] = rng.choice(leaves)
    return {"type": "object", "properties": props, "required": sorted(props)}


def compile_times(generated: int) -> dict[str, Any]:
    from peftserve.server.engine.structured import ConstraintCompiler
    from peftserve.server.engine.types import Constraint, ConstraintKind
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO / "base")
    big = {
        "type": "object",
        "properties": {f"f{i}": {"type": "string", "pattern": "[a-z]{1,8}"} for i in range(300)},
        "required": [f"f{i}" for i in range(300)],
    }
    schemas = [SCHEMA_ANIMAL, SCHEMA_PERSON, SCHEMA_NOTE, big]
    rng = random.Random(0)
    schemas += [random_schema(rng) for _ in range(generated)]
    constraints = [Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(s)) for s in schemas] + [
        Constraint(ConstraintKind.JSON_OBJECT),
        Constraint(ConstraintKind.REGEX, r"[0-9]{4}-[0-9]{2}-[0-9]{2}"),
        Constraint(ConstraintKind.REGEX, "[a-z ]+"),
        Constraint(ConstraintKind.GRAMMAR, 'start: word (" " word)*\nword: /[a-z]+/'),
        Constraint(ConstraintKind.CHOICE, choices=("yes", "no", "maybe")),
    ]
    compiler = ConstraintCompiler(
        tokenizer,
        len(tokenizer),
        max_text_length=10**7,
        timeout_s=60.0,
        cache_size=1,  # each constraint below is compiled fresh
        threads=1,
        max_choices=64,
    )
    compiler.compile(constraints[-1])  # builds the tokenizer table once, not counted
    times_ms = []
    for constraint in constraints:
        start = time.perf_counter()
        compiler.compile(constraint)
        times_ms.append((time.perf_counter() - start) * 1000)
    compiler.close()
    ordered = sorted(times_ms)
    return {
        "constraints": len(constraints),
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "max_ms": round(ordered[-1], 3),
        "big_schema_ms": round(times_ms[3], 3),
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        "# Structured output: constrained vs unconstrained, compile times",
        "",
        "`python -m bench.structured` (demo model, one server, greedy, "
        f"exactly {MAX_NEW_TOKENS} new tokens per row; mixed = every other request constrained; "
        "ratio = mixed / unconstrained tokens per second, median of the rounds).",
        "",
        "Wall-clock ratios swing with whatever else the machine runs; tokens per server CPU "
        "second measure the same work without the other processes' share of the cores.",
        "",
        "| clients | unconstrained tok/s | mixed tok/s | ratio (wall) | ratio (server CPU) "
        "| target | met (wall / CPU) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cell in result["throughput"]:
        plain = statistics.median(r["unconstrained_tokens_per_s"] for r in cell["rounds"])
        mixed = statistics.median(r["mixed_tokens_per_s"] for r in cell["rounds"])
        met = f"{'yes' if cell['met'] else 'no'} / {'yes' if cell['cpu_met'] else 'no'}"
        lines.append(
            f"| {cell['clients']} | {plain:.0f} | {mixed:.0f} | {cell['ratio_median']:.3f} "
            f"| {cell['cpu_ratio_median']:.3f} | >= {cell['target']} | {met} |"
        )
    c = result["compile"]
    lines += [
        "",
        f"Compile (fresh, {c['constraints']} constraints: the tests' schemas, regexes, grammar, "
        f"choice and generated schemas): p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms, "
        f"max {c['max_ms']} ms (the 300-field schema: {c['big_schema_ms']} ms).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--waves", type=int, default=4, help="requests per client per run")
    parser.add_argument("--generated-schemas", type=int, default=200)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"compile": compile_times(args.generated_schemas)}
    print("compile:", result["compile"])
    result["throughput"] = (
        [] if args.skip_throughput else throughput(args.rounds, args.waves, args.out)
    )
    (args.out / "structured.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "structured.md").write_text(report(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
