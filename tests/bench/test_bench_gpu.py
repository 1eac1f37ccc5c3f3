"""The GPU mode: its roofline arithmetic, and a clean refusal where there is no CUDA."""

from __future__ import annotations

import pytest

from bench.gpu import roofline_tokens_per_s
from bench.run import main


def test_roofline_scales_with_batch_and_bandwidth() -> None:
    # 2 GB of weights at 2000 GB/s: 1 ms per step, so 1000 tokens/s per row.
    assert roofline_tokens_per_s(1, 2_000_000_000, 2000.0) == pytest.approx(1000.0)
    assert roofline_tokens_per_s(8, 2_000_000_000, 2000.0) == pytest.approx(8000.0)


def test_gpu_mode_refuses_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal path cannot be exercised")
    assert main(["--gpu"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
