"""The staged-writes bench's targets for transfers in blocks agree with the staged_writes layer.

``bench/fidelity/staged_writes.py`` compares what an ``azure-blob`` mount makes the
application wait with targets it simulates from the profile's description (blocks of
4 MiB, 32 requests in flight, a shared link). Here those targets meet the layer itself
in virtual time, and the one case with a closed form: blocks all in flight at once on
a link too fast to matter wait for the slowest of their requests.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
from pathlib import Path
from statistics import NormalDist

import pytest
import trio
import trio.testing

from interposer.fuse_worker import Op, Stack
from interposer.proto import Policy, StagedWritesLayer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "fidelity"))
from staged_writes import REQUEST, Blocks, Hold  # noqa: E402 - bench/fidelity/staged_writes.py

MIB = 1 << 20


def test_blocks_in_flight_together_wait_for_the_slowest_request() -> None:
    # the max of 4 log-normal draws is below x with probability Phi(z)**4, z = ln(x / median) / sigma
    median_of_max = REQUEST.median_s * math.exp(REQUEST.sigma * NormalDist().inv_cdf(0.5 ** 0.25))
    target = Hold(0, 0.0, Blocks(16 * MIB, 4 * MIB, 32, 1e15)).quantile_fn()
    assert target(0.5) == pytest.approx(median_of_max, rel=0.03)


@pytest.mark.parametrize("size", [4 * MIB, 16 * MIB, 64 * MIB, 200 * MIB])
def test_the_target_of_a_download_in_blocks_is_what_the_layer_holds(size: int) -> None:
    rate = 256 * MIB
    layer = StagedWritesLayer(rate_bytes_per_s=rate, distribution=REQUEST, download_on_open=True, new_files="staged",
                              transfer_block_bytes=4 * MIB, transfer_parallelism=32, seed=9)
    stack = Stack(Policy(layers=[layer]), 1)

    async def main() -> list[float]:
        took = []
        for ino in range(2, 1002):
            op = Op("open", ino, f"/blob{ino}", size=size, open_flags=os.O_RDONLY)
            op.file_size = size

            async def call() -> None:
                return None

            started = trio.current_time()
            await stack.chains["open"](op, call)
            took.append(trio.current_time() - started)
            stack.released(0, ino)
        return took

    held = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    target = Hold(0, 0.0, Blocks(size, 4 * MIB, 32, rate)).quantile_fn()
    deciles = statistics.quantiles(held, n=10)
    assert deciles[4] == pytest.approx(target(0.5), rel=0.04) and deciles[8] == pytest.approx(target(0.9), rel=0.05)
