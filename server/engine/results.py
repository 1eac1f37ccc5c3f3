"""A request's final ``GenerationResult``, built from its rows (or beam sequences)."""

from __future__ import annotations

import time

from .handle import Job
from .types import FinishReason, GenerationResult, SequenceResult


def build_result(job: Job, default_reason: FinishReason, model_id: str) -> GenerationResult:
    """The result as it stands; ``default_reason`` fills sequences that never finished."""
    now = time.monotonic()
    prepared = job.prepared
    e = prepared.effective
    sequences: list[SequenceResult]
    if job.beam_sequences is not None:
        sequences = job.beam_sequences
    elif job.rows and not prepared.beams:
        sequences = [
            SequenceResult(
                index=row.index,
                text=row.stream.text,
                token_ids=tuple(row.tokens),
                finish_reason=row.finish_reason or default_reason,
                logprobs=tuple(row.logprobs),
                incomplete=row.incomplete or (row.constraint is not None and not row.finished),
            )
            for row in job.rows
        ]
    else:
        sequences = [
            SequenceResult(i, "", (), default_reason) for i in range(e.num_return_sequences)
        ]
    started = job.started_at if job.started_at is not None else now
    adapter = prepared.adapter
    return GenerationResult(
        request_id=job.request_id,
        sequences=tuple(sequences),
        prompt_tokens=len(prepared.prompt_ids),
        completion_tokens=sum(len(s.token_ids) for s in sequences),
        adapter=adapter.name if adapter else "",
        adapter_sha256=adapter.sha256 if adapter else "",
        effective=e,
        model_id=model_id,
        queue_wait_ms=(started - job.enqueued_at) * 1000.0,
        inference_ms=(now - started) * 1000.0 if job.started_at is not None else 0.0,
        batch_size=job.batch_size,
    )
