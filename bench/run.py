"""``python -m bench.run`` (``make bench``): run the baselines, compute the ratios, write a report.

Baselines, all on the same seeded workload (prompts, adapters, exact output lengths, greedy):

* (a) ``PeftModel.generate`` in this process, one request at a time;
* (b) peftserve with ``--max-batch-size 1``;
* (c) peftserve batched (``--max-batch-size`` = the largest concurrency), unary and streaming;
* (d) ``transformers serve --continuous-batching`` on the base model, over HTTP;
* (e) peftserve batched with a mix of adapters vs a single adapter at the same concurrency;

then the scenarios of ``bench/scenarios.py`` (natural lengths, Poisson arrivals, streams next to
beam searches, a cancelled row's place reused; a registry others extend), and the targets of
``bench/targets.py``, each met or not, into ``results.json`` and ``results.md``.

Every server is a subprocess on 127.0.0.1, started and stopped here; only one system runs at a
time, so none steals CPU from another. peftserve runs with ``--metrics-address``, so each cell
also records the server's own step counts. ``--quick`` is the smoke run ``make test`` uses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .cells import (
    Background,
    Cell,
    CpuMeter,
    cell_record,
    measure_cell,
    warmup_specs,
    workload_for,
)
from .loadgen import LOAD_MODES, LoadConfig, PeftServeTarget, Target, TransformersServeTarget
from .machine import environment, load_average
from .metrics import LatencyObjective
from .profiling import PySpyRecorder, summarize_collapsed
from .report import write_report
from .scenarios import SCENARIOS, ScenarioContext
from .servers import (
    ServerProcess,
    child_env,
    free_port,
    peftserve_command,
    transformers_serve_command,
)
from .targets import evaluate
from .workload import ADAPTER_MIXES, RequestSpec, WorkloadConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO_ROOT / "models" / "demo" / "base"
DEMO_ADAPTERS = REPO_ROOT / "models" / "demo" / "adapters"
BASELINES: tuple[str, ...] = ("a", "b", "c", "d", "e")


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive integers")
    return values


def _token_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        bounds = (int(low), int(high or low))
    except ValueError as err:
        raise argparse.ArgumentTypeError("expected LOW:HIGH, e.g. 16:48") from err
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise argparse.ArgumentTypeError("expected 1 <= LOW <= HIGH")
    return bounds


def _float_list(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive numbers")
    return values


def _names_in(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of names, each one of ``choices``."""

    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = sorted(set(values) - set(choices))
        if unknown:
            known = ", ".join(choices)
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {known}")
        return values

    return parse


_scenario_list = _names_in(SCENARIOS, "scenarios")
_baseline_list = _names_in(BASELINES, "baselines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark peftserve against its baselines on 127.0.0.1 and write a report.",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run (< 1 min, skips (d))")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out")
    parser.add_argument(
        "--concurrency", type=_int_list, default=None, help="clients, e.g. 1,4,16,64"
    )
    parser.add_argument("--requests", type=int, default=None, help="requests per cell")
    parser.add_argument("--duration-s", type=float, default=None, help="time cap per cell")
    parser.add_argument("--mode", choices=LOAD_MODES, default="closed")
    parser.add_argument("--rate", type=float, default=20.0, help="open-loop arrivals per second")
    parser.add_argument("--adapters", choices=ADAPTER_MIXES, default="uniform", help="adapter mix")
    parser.add_argument("--stream", action="store_true", help="stream in the main sweep")
    parser.add_argument("--baselines", type=_baseline_list, default=None, help="e.g. a,b,c,d,e")
    parser.add_argument("--output-tokens", type=_token_range, default=None, help="LOW:HIGH")
    parser.add_argument("--torch-threads", type=int, default=1, help="per model process")
    parser.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    parser.add_argument("--slo-e2e-ms", type=float, default=10000.0)
    parser.add_argument("--model-path", type=Path, default=DEMO_MODEL)
    parser.add_argument("--adapters-dir", type=Path, default=DEMO_ADAPTERS)
    parser.add_argument("--seed", type=int, default=0)
    scenarios = parser.add_argument_group("scenarios (bench/scenarios.py)")
    scenarios.add_argument(
        "--scenarios",
        type=_scenario_list,
        default=None,
        help=f"comma-separated, default all: {', '.join(SCENARIOS)}",
    )
    scenarios.add_argument("--natural-concurrency", type=int, default=16)
    scenarios.add_argument("--natural-max-tokens", type=int, default=64, help="the cap")
    scenarios.add_argument(
        "--rates", type=_float_list, default=[8.0, 16.0, 32.0, 48.0], help="Poisson req/s"
    )
    scenarios.add_argument("--rate-duration-s", type=float, default=15.0, help="per rate")
    scenarios.add_argument("--beam-stream-clients", type=int, default=16)
    scenarios.add_argument("--beam-clients", type=int, default=2)
    scenarios.add_argument("--num-beams", type=int, default=4)
    scenarios.add_argument("--cancel-trials", type=int, default=5)
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="py-spy the batched server at the top concurrency (default: on, off in --quick)",
    )
    gpu = parser.add_argument_group("GPU mode")
    gpu.add_argument("--gpu", action="store_true", help="random-weights model on CUDA, roofline")
    gpu.add_argument("--gpu-preset", default="1b", help="server/synthetic.py preset")
    gpu.add_argument("--gpu-adapters", type=int, default=4, help="random LoRA adapters")
    gpu.add_argument(
        "--gpu-bandwidth-gbs",
        type=float,
        default=3350.0,
        help="memory bandwidth for the roofline, GB/s (default: H100 SXM HBM3)",
    )
    gpu.add_argument("--gpu-concurrency", type=_int_list, default=[1, 8, 32, 64, 128])
    return parser


@dataclass
class Settings:
    """The resolved run settings: CLI values with the quick/full defaults filled in."""

    args: argparse.Namespace
    concurrency: list[int]
    requests: int
    duration_s: float
    baselines: list[str]
    output_tokens: tuple[int, int]
    profile: bool
    objective: LatencyObjective
    workload: WorkloadConfig
    scenarios: list[str] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    mixable: list[str] = field(default_factory=list)

    @property
    def top(self) -> int:
        return 0 if self.args.mode == "open" else max(self.concurrency)

    @property
    def points(self) -> list[int]:
        # Open loop has no client count: one cell per system at --rate, recorded as 0 clients.
        return [0] if self.args.mode == "open" else sorted(set(self.concurrency))


def resolve(args: argparse.Namespace) -> Settings:
    quick = args.quick
    concurrency = args.concurrency or ([1, 4] if quick else [1, 4, 16, 64])
    output_tokens = args.output_tokens or ((4, 8) if quick else (16, 48))
    baselines = args.baselines
    if baselines is None:
        baselines = ["a", "b", "c", "e"] if quick else list(BASELINES)
    workload = WorkloadConfig(
        num_requests=0,
        adapter_mix=args.adapters,
        min_output_tokens=output_tokens[0],
        max_output_tokens=output_tokens[1],
        seed=args.seed,
    )
    return Settings(
        args=args,
        concurrency=concurrency,
        # 160 requests: 20-30 s per one-client cell on an idle 2-core machine, and at least six
        # rounds of 16 clients; 64 clients get six rounds (384) whatever this says.
        requests=args.requests or (8 if quick else 160),
        duration_s=args.duration_s or (10.0 if quick else 45.0),
        baselines=baselines,
        output_tokens=output_tokens,
        profile=(not quick) if args.profile is None else args.profile,
        objective=LatencyObjective(ttft_ms=args.slo_ttft_ms, e2e_ms=args.slo_e2e_ms),
        workload=workload,
        scenarios=args.scenarios
        if args.scenarios is not None
        else [name for name, sc in SCENARIOS.items() if sc.quick or not quick],
    )


def discover_adapters(adapters_dir: Path | None) -> tuple[list[str], list[str]]:
    """Adapter names (mixable ones first, so "single" picks a plain LoRA) and the mixable ones.

    Mirrors the engine's rule (plain LoRA mixes in one batch; anything else runs in batches of
    its own); the server's own ``ListAdapters`` answer is recorded in the report to confirm it.
    """
    if adapters_dir is None or not adapters_dir.is_dir():
        return [], []
    mixable: list[str] = []
    other: list[str] = []
    for path in sorted(adapters_dir.iterdir()):
        config_path = path / "adapter_config.json"
        if not config_path.is_file():
            continue
        config = json.loads(config_path.read_text())
        plain_lora = config.get("peft_type") == "LORA" and not config.get("use_dora")
        (mixable if plain_lora else other).append(path.name)
    return mixable + other, mixable


class Runner:
    """Runs the planned cells system by system and collects their records."""

    def __init__(self, settings: Settings, out_dir: Path) -> None:
        self.s = settings
        self.out_dir = out_dir
        self.cells: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.profile: dict[str, Any] | None = None
        self.server_adapters: list[dict[str, Any]] = []
        # Scenario records beyond cells (results["scenarios"]) and work to run after servers.
        self.scenario_records: dict[str, dict[str, Any]] = {}
        self.deferred: list[Callable[[], None]] = []
        self._generator: Any = None

    # -- helpers --
    def _load(self, cell: Cell) -> LoadConfig:
        return LoadConfig(
            mode=cell.mode,
            concurrency=max(1, cell.concurrency),
            rate_rps=cell.rate_rps or self.s.args.rate,
            duration_s=self.s.duration_s,
            stream=cell.stream,
            seed=self.s.args.seed,
        )

    def _count(self, cell: Cell) -> int:
        # At least six rounds of every client: a closed loop needs a few to reach its steady
        # state, and the first and last rounds (ramp-up, drain) should not dominate the window.
        return max(self.s.requests, 6 * cell.concurrency)

    def measure(
        self,
        cell: Cell,
        server: ServerProcess,
        make_target: Callable[[], Target],
        specs: Sequence[RequestSpec] | None = None,
        load: LoadConfig | None = None,
        background: Background | None = None,
        keep_tokens: bool = False,
    ) -> dict[str, Any]:
        """Measure one cell on a running server (the main sweep's workload by default)."""
        if specs is None:
            specs = workload_for(
                self.s.workload, cell, self._count(cell), self.s.adapters, self.s.mixable
            )
        warm = warmup_specs(
            replace(self.s.workload, natural=cell.workload == "natural"),
            cell,
            self.s.adapters,
            self.s.mixable,
        )
        cpu = CpuMeter(server.pid)
        result = measure_cell(
            cell,
            make_target,
            specs,
            load or self._load(cell),
            warm,
            server.log_lines,
            cpu,
            background,
            server.metrics_port,
        )
        extra: dict[str, Any] = {}
        if keep_tokens:
            extra["output_tokens_by_request"] = {
                s.request_id: s.output_tokens for s in result.samples if s.ok
            }
        record = cell_record(cell, result, self.s.objective, cpu, **extra)
        self.cells.append(record)
        _print_cell(record)
        return record

    def _cell(
        self,
        baseline: str,
        system: str,
        label: str,
        concurrency: int,
        stream: bool,
        mix: str,
        max_batch_size: int | None,
        series: str | None,
    ) -> Cell:
        rpc = "stream" if stream else "unary"
        point = f"r{self.s.args.rate:g}" if self.s.args.mode == "open" else f"c{concurrency}"
        return Cell(
            id=f"{system}-{rpc}-{mix}-{point}",
            baseline=baseline,
            system=system,
            label=label,
            concurrency=concurrency,
            mode=self.s.args.mode,
            stream=stream,
            adapter_mix=mix,
            max_batch_size=max_batch_size,
            series=series,
        )

    def _peftserve(self, name: str, max_batch_size: int) -> ServerProcess:
        args = self.s.args
        adapters_dir = args.adapters_dir if args.adapters_dir.is_dir() else None
        metrics_port = free_port()
        return ServerProcess(
            name,
            peftserve_command(
                args.model_path,
                adapters_dir,
                max_batch_size,
                ["--metrics-address", f"127.0.0.1:{metrics_port}"],
            ),
            child_env(args.torch_threads),
            self.out_dir / "logs" / f"{name}.log",
            metrics_port=metrics_port,
        )

    # -- systems --
    def run_batched(self) -> None:
        """(c), the stream/unary pair, (e), the base-model cells for (d), the scenarios that
        share this server, and the profile."""
        s, mix = self.s, self.s.args.adapters
        wanted = set(s.baselines)
        max_batch = max(s.concurrency)
        label = f"(c) peftserve max_batch_size={max_batch}"
        server = self._peftserve("peftserve-batched", max_batch)
        print(f"starting {server.name} ...", file=sys.stderr, flush=True)
        with server:
            address = server.start()
            self._record_server_adapters(address)

            def target() -> PeftServeTarget:
                return PeftServeTarget(address)

            if wanted & {"c", "e"}:
                for stream in (s.args.stream, not s.args.stream):
                    rpc = "stream" if stream else "unary"
                    for point in s.points:
                        cell = self._cell(
                            "c",
                            "peftserve",
                            f"{label}, {rpc}",
                            point,
                            stream,
                            mix,
                            max_batch,
                            f"(c) peftserve batched, {rpc}",
                        )
                        self.measure(cell, server, target)
            extra_mixes: list[tuple[str, int]] = []
            if "e" in wanted:
                extra_mixes += [("single", s.top)]
                if mix not in ("uniform", "skewed"):
                    extra_mixes.append(("uniform", s.top))
                if mix != "mixable":
                    extra_mixes.append(("mixable", s.top))
            if "d" in wanted:
                # The same points as (d) runs at: its lowest and its top concurrency.
                extra_mixes += [("base", point) for point in sorted({min(s.points), s.top})]
            for extra, point in dict.fromkeys(m for m in extra_mixes if m[0] != mix):
                cell = self._cell(
                    "e" if extra != "base" else "c",
                    "peftserve",
                    f"{label}, unary, adapters={extra}",
                    point,
                    False,
                    extra,
                    max_batch,
                    # A short series: it puts e.g. the base-model cells next to (d) on the plot.
                    f"(c) peftserve batched, unary, adapters={extra}",
                )
                self.measure(cell, server, target)
            for name in s.scenarios:
                scenario = SCENARIOS[name]
                if scenario.max_batch_size in (None, max_batch):
                    print(f"scenario {name} ...", file=sys.stderr, flush=True)
                    self._run_scenario(name, ScenarioContext(self, server, address, max_batch))
            if s.profile:
                self._profile(server, target, label, max_batch)

    def run_own_server_scenarios(self) -> None:
        """Scenarios that need a server of their own (another batch size)."""
        for name in self.s.scenarios:
            scenario = SCENARIOS[name]
            if scenario.max_batch_size in (None, max(self.s.concurrency)):
                continue  # ran on the shared batched server
            server = self._peftserve(f"peftserve-{name}", scenario.max_batch_size)
            print(f"starting {server.name} for scenario {name} ...", file=sys.stderr, flush=True)
            with server:
                address = server.start()
                context = ScenarioContext(self, server, address, scenario.max_batch_size)
                self._run_scenario(name, context)
            record = self.scenario_records.get(name)
            if record is not None:
                print(f"  {name}: {_brief(record)}", file=sys.stderr, flush=True)

    def _run_scenario(self, name: str, context: ScenarioContext) -> None:
        """Run one scenario; a failure is reported and skipped, the rest of the run goes on."""
        try:
            SCENARIOS[name].run(context)
        except Exception as error:
            traceback.print_exc()
            self.skipped.append({"baseline": f"scenario {name}", "reason": repr(error)[:300]})

    def _record_server_adapters(self, address: str) -> None:
        import asyncio

        from peftserve.client import AsyncPeftServeClient

        async def ask() -> list[dict[str, Any]]:
            async with AsyncPeftServeClient(address, timeout_s=30) as client:
                return [
                    {"name": a.name, "peft_type": a.peft_type, "mixed_batching": a.mixed_batching}
                    for a in await client.list_adapters()
                ]

        self.server_adapters = asyncio.run(ask())

    def _profile(
        self,
        server: ServerProcess,
        target: Callable[[], Target],
        label: str,
        max_batch: int,
    ) -> None:
        cell = self._cell(
            "c",
            "peftserve-profiled",
            f"{label}, unary, under py-spy",
            self.s.top,
            False,
            self.s.args.adapters,
            max_batch,
            None,
        )
        raw = self.out_dir / "profile" / "peftserve-batched.pyspy.txt"
        recorder = PySpyRecorder(server.pid, raw)
        if not recorder.start():
            self.profile = {"cell": cell.id, "error": recorder.error}
            return
        try:
            self.measure(cell, server, target)
        finally:
            path = recorder.stop()
        if path is None:
            self.profile = {"cell": cell.id, "error": recorder.error}
        else:
            self.profile = {"cell": cell.id, "raw": str(path), "summary": summarize_collapsed(path)}

    def run_unbatched(self) -> None:
        """(b): the same server with max_batch_size=1, at concurrency 1 and the top."""
        s = self.s
        server = self._peftserve("peftserve-b1", 1)
        print(f"starting {server.name} ...", file=sys.stderr, flush=True)
        with server:
            address = server.start()

            def target() -> PeftServeTarget:
                return PeftServeTarget(address)

            points = sorted({min(s.points), max(s.points)})
            for point in points:
                cell = self._cell(
                    "b",
                    "peftserve-b1",
                    "(b) peftserve max_batch_size=1, unary",
                    point,
                    False,
                    s.args.adapters,
                    1,
                    "(b) peftserve max_batch_size=1, unary",
                )
                self.measure(cell, server, target)

    def _inprocess_generator(self) -> Any:
        """One in-process model set (base + every adapter) for every in-process cell."""
        from .inprocess import InProcessGenerator

        if self._generator is None:
            s = self.s
            print("loading the in-process baseline ...", file=sys.stderr, flush=True)
            adapters_dir = s.args.adapters_dir if s.args.adapters_dir.is_dir() else None
            self._generator = InProcessGenerator(
                s.args.model_path, adapters_dir, s.adapters, s.args.torch_threads
            )
        return self._generator

    def run_inprocess_cell(
        self,
        cell: Cell,
        specs: Sequence[RequestSpec],
        duration_s: float | None = None,
        keep_tokens: bool = False,
    ) -> dict[str, Any]:
        """Run ``specs`` one by one through ``PeftModel.generate`` in this process."""
        from .inprocess import run_inprocess

        generator = self._inprocess_generator()
        warm = warmup_specs(
            replace(self.s.workload, natural=cell.workload == "natural"),
            cell,
            self.s.adapters,
            self.s.mixable,
        )
        run_inprocess(generator, [w for w in warm if w.adapter in generator.models], 60.0)
        cpu = CpuMeter()
        cpu.start()
        result = run_inprocess(
            generator, specs, self.s.duration_s if duration_s is None else duration_s
        )
        cpu.stop()
        extra: dict[str, Any] = {}
        if keep_tokens:
            extra["output_tokens_by_request"] = {
                s.request_id: s.output_tokens for s in result.samples if s.ok
            }
        record = cell_record(cell, result, self.s.objective, cpu, **extra)
        self.cells.append(record)
        _print_cell(record)
        return record

    def run_inprocess(self) -> None:
        """(a): PeftModel.generate in this process, serially."""
        s = self.s
        cell = Cell(
            id=f"inprocess-unary-{s.args.adapters}-c1",
            baseline="a",
            system="inprocess",
            label="(a) in-process PeftModel.generate, serial",
            concurrency=1,
            mode="closed",
            stream=False,
            adapter_mix=s.args.adapters,
        )
        specs = workload_for(s.workload, cell, s.requests, s.adapters, s.mixable)
        self.run_inprocess_cell(cell, specs)

    def run_transformers_serve(self) -> None:
        """(d): transformers serve with continuous batching, base model, over HTTP."""
        from transformers.utils.import_utils import is_serve_available

        s = self.s
        if not is_serve_available():
            self.skipped.append(
                {
                    "baseline": "d",
                    "reason": "transformers[serving] extra's "
                    "dependencies are not installed (pip install fastapi uvicorn "
                    "openai starlette)",
                }
            )
            return
        port = free_port()
        server = ServerProcess(
            "transformers-serve",
            transformers_serve_command(s.args.model_path, port),
            child_env(s.args.torch_threads),
            self.out_dir / "logs" / "transformers-serve.log",
            ready_url=f"http://127.0.0.1:{port}/health",
        )
        print(f"starting {server.name} ...", file=sys.stderr, flush=True)
        special = _special_token_ids(s.args.model_path)
        with server:
            try:
                server.start()
            except (RuntimeError, TimeoutError) as error:
                self.skipped.append({"baseline": "d", "reason": f"could not start: {error}"})
                return
            for point in sorted({min(s.points), max(s.points)}):
                cell = self._cell(
                    "d",
                    "transformers-serve",
                    "(d) transformers serve --continuous-batching, base, unary",
                    point,
                    False,
                    "base",
                    None,
                    "(d) transformers serve (CB), base model, unary",
                )

                def target(point: int = point) -> TransformersServeTarget:
                    return TransformersServeTarget(
                        f"http://127.0.0.1:{port}",
                        str(s.args.model_path),
                        special,
                        max_connections=max(1, point) + 8,
                    )

                record = self.measure(cell, server, target)
                if record["metrics"]["ok"] == 0:
                    self.skipped.append(
                        {
                            "baseline": "d",
                            "reason": f"every request failed ({record['metrics']['errors']}); "
                            f"server log tail: {server.log_tail(5)}",
                        }
                    )
                    return


def _print_cell(record: dict[str, Any]) -> None:
    m = record["metrics"]

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.2f}"

    steps = record.get("server_steps") or {}
    queue = m.get("queue_wait_steps") or {}
    print(
        f"  {record['id']}: {m['ok']}/{m['requests']} ok, {m['output_tokens_per_s']:.1f} tok/s, "
        f"{m['request_throughput_rps']:.2f} req/s, mean batch {fmt(m['mean_batch_size'])}, "
        f"step {fmt(steps.get('mean_step_ms'))} ms, queue p50 {fmt(queue.get('p50'))} steps, "
        f"cores busy: server {fmt(m['server_cores_busy'])}, client {fmt(m['client_cores_busy'])}"
        f", other {fmt(m['other_cores_busy'])}",
        file=sys.stderr,
        flush=True,
    )


def _brief(record: dict[str, Any]) -> str:
    keys = ("steps_median", "steps_max", "ms_median", "valid_trials")
    return ", ".join(f"{k} {record[k]}" for k in keys if k in record)


def _special_token_ids(model_path: Path) -> dict[str, int]:
    """bos/eos/pad ids from the model's generation (or model) config."""
    ids: dict[str, int] = {}
    for name in ("generation_config.json", "config.json"):
        path = model_path / name
        if path.is_file():
            config = json.loads(path.read_text())
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if isinstance(config.get(key), int):
                    ids.setdefault(key, config[key])
    return ids


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.gpu:
        from .gpu import run_gpu

        return run_gpu(args)
    settings = resolve(args)
    if not args.model_path.is_dir() or not (args.model_path / "config.json").is_file():
        print(f"no model at {args.model_path} (config.json missing)", file=sys.stderr)
        return 2
    settings.adapters, settings.mixable = discover_adapters(args.adapters_dir)
    if settings.workload.adapter_mix != "base" and not settings.adapters:
        # No adapters to mix: say so in every cell id instead of pretending to mix.
        args.adapters = "base"
        settings.workload = replace(settings.workload, adapter_mix="base")
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_at_start = load_average()
    runner = Runner(settings, out_dir)
    wanted = set(settings.baselines)
    # Servers first, the in-process baselines after: each system runs alone on the machine.
    shared = [
        n
        for n in settings.scenarios
        if SCENARIOS[n].max_batch_size in (None, max(settings.concurrency))
    ]
    if wanted & {"c", "d", "e"} or shared:
        runner.run_batched()
    runner.run_own_server_scenarios()
    if "b" in wanted:
        runner.run_unbatched()
    if "d" in wanted:
        runner.run_transformers_serve()
    if "a" in wanted:
        runner.run_inprocess()
    for deferred in runner.deferred:
        deferred()
    for baseline in BASELINES:
        if baseline not in wanted:
            reason = "quick mode" if args.quick else "not selected with --baselines"
            runner.skipped.append({"baseline": baseline, "reason": reason})
    results: dict[str, Any] = {
        "meta": {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "elapsed_s": time.time() - started,
            "mode_name": "quick" if args.quick else "full",
            "argv": list(sys.argv[1:] if argv is None else argv),
            "load_mode": args.mode,
            "rate_rps": args.rate if args.mode == "open" else None,
            "concurrency": settings.concurrency,
            "requests_per_cell": settings.requests,
            "duration_cap_s": settings.duration_s,
            "model_path": str(args.model_path),
            "adapters": settings.adapters,
            "mixable_adapters": settings.mixable,
            "server_adapters": runner.server_adapters,
            "adapter_mix": settings.workload.adapter_mix,
            "min_output_tokens": settings.output_tokens[0],
            "max_output_tokens": settings.output_tokens[1],
            "torch_threads": args.torch_threads,
            "objective": {"ttft_ms": args.slo_ttft_ms, "e2e_ms": args.slo_e2e_ms},
            "scenarios": settings.scenarios,
            "load_average_start": load_at_start,
            "load_average_end": load_average(),
            "environment": environment(),
        },
        "cells": runner.cells,
        "scenarios": runner.scenario_records,
        "skipped": runner.skipped,
        "profile": runner.profile,
    }
    results["targets"] = evaluate(results)
    paths = write_report(results, out_dir)
    print(f"wrote {paths['markdown']} and {paths['json']}", file=sys.stderr)
    for row in results["targets"]:
        value = "n/a" if row["value"] is None else f"{row['value']:.2f}{row['unit']}"
        verdict = (
            "info"
            if row["informational"]
            else {True: "met", False: "MISSED"}.get(row["met"], "not measured")
        )
        print(
            f"  {row['name']}: {value} (target {row['op']} {row['target']}): {verdict}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
