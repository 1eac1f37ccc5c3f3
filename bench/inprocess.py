"""Baseline (a): ``PeftModel.generate`` in this process, one request at a time.

The floor every server is measured against: the same prompts, adapters and greedy parameters,
with no RPC, no queue and no batching. Each adapter gets its own ``PeftModel`` over its own
copy of the base model (adapters of different PEFT types cannot share one ``PeftModel``), and
base-model requests run on an untouched base model.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .loadgen import LoadResult, RequestSample
from .workload import RequestSpec

__all__ = ["InProcessGenerator", "run_inprocess"]


class InProcessGenerator:
    """Loads the base model, its adapters and tokenizer once; generates one request per call."""

    def __init__(
        self, model_path: Path, adapters_dir: Path | None, adapters: Sequence[str], threads: int
    ) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # Loading bars and deprecation chatter would drown the benchmark's own progress output.
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        torch.set_num_threads(threads)
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.models: dict[str, Any] = {
            "": AutoModelForCausalLM.from_pretrained(str(model_path)).eval()
        }
        for name in adapters:
            if adapters_dir is None:
                raise ValueError(f"adapter {name!r} requested but no adapters directory given")
            base = AutoModelForCausalLM.from_pretrained(str(model_path))
            with warnings.catch_warnings():
                # peft trips a transformers deprecation warning on every load; it is noise here.
                warnings.simplefilter("ignore", FutureWarning)
                model = PeftModel.from_pretrained(base, str(adapters_dir / name))
            self.models[name] = model.eval()

    def generate(self, spec: RequestSpec) -> RequestSample:
        sample = RequestSample(spec.request_id, spec.adapter, False, time.perf_counter())
        model = self.models[spec.adapter]
        # Tokenization is inside the timed region, as it is inside the server's.
        inputs = self.tokenizer(spec.prompt, return_tensors="pt")
        with self._torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=spec.output_tokens,
                min_new_tokens=spec.output_tokens if spec.exact_length else None,
                num_beams=spec.num_beams,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        prompt_tokens = int(inputs["input_ids"].shape[1])
        generated = output[0, prompt_tokens:].tolist()
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos in generated:
            # A natural-length request ends at EOS: the server counts the EOS token as
            # generated and returns nothing after it (there is nothing after it for one row).
            generated = generated[: generated.index(eos) + 1]
        # Detokenize too: the server returns text, so the baseline must pay for it as well.
        self.tokenizer.decode(generated, skip_special_tokens=True)
        sample.end_s = time.perf_counter()
        sample.prompt_tokens = prompt_tokens
        sample.output_tokens = len(generated)
        sample.ok = True
        sample.batch_size = 1
        return sample


def run_inprocess(
    generator: InProcessGenerator,
    specs: Sequence[RequestSpec],
    duration_s: float,
    on_done: Callable[[RequestSample], None] | None = None,
) -> LoadResult:
    """Run ``specs`` back to back (stopping after ``duration_s``)."""
    samples: list[RequestSample] = []
    started = time.perf_counter()
    for spec in specs:
        if time.perf_counter() - started >= duration_s:
            break
        sample = generator.generate(spec)
        samples.append(sample)
        if on_done is not None:
            on_done(sample)
    ended = samples[-1].end_s if samples else time.perf_counter()
    return LoadResult(samples=samples, started_s=started, ended_s=ended)
