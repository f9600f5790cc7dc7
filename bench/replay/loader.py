"""A training job's input pipeline, as a workload to record and replay (``bench/replay/run.py``).

``--threads`` loader threads share the files of ``ROOT/data`` (file ``i`` goes to
thread ``i mod threads``); each opens its file, reads it whole in ``--read-kib``
reads, closes it and "computes" for ``--think-ms`` (a sleep) before the next. Every
``--checkpoint-every`` files, thread 0 writes a checkpoint as a training loop does:
``--checkpoint-mib`` of 1 MiB writes into ``ROOT/ckpt/tmp``, fsync, rename to
``step-N.bin``. Prints ``{"wall_s": …}``: the job's time from start to end.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import click

_MIB = 1 << 20


def _load(root: Path, files: list[str], read_bytes: int, think_s: float, checkpoint: tuple[int, int] | None) -> None:
    every, size_mib = checkpoint or (0, 0)
    block = os.urandom(_MIB)
    for count, name in enumerate(files, start=1):
        fd = os.open(root / "data" / name, os.O_RDONLY)
        try:
            while os.read(fd, read_bytes):
                pass
        finally:
            os.close(fd)
        time.sleep(think_s)
        if every and count % every == 0:
            tmp = root / "ckpt" / "tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for _ in range(size_mib):
                    os.write(fd, block)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, root / "ckpt" / f"step-{count}.bin")


@click.command()
@click.argument("root", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--threads", default=4, show_default=True)
@click.option("--read-kib", default=256, show_default=True)
@click.option("--think-ms", default=5.0, show_default=True)
@click.option("--checkpoint-every", default=64, show_default=True, help="Files of thread 0 between checkpoints (0: none).")
@click.option("--checkpoint-mib", default=16, show_default=True)
def main(root: Path, threads: int, read_kib: int, think_ms: float, checkpoint_every: int,
         checkpoint_mib: int) -> None:
    """Read ROOT/data's files whole on THREADS threads, with think time and checkpoints."""
    (root / "ckpt").mkdir(exist_ok=True)
    names = sorted(os.listdir(root / "data"))
    workers = [threading.Thread(target=_load, args=(
        root, names[index::threads], read_kib * 1024, think_ms / 1000,
        (checkpoint_every, checkpoint_mib) if index == 0 and checkpoint_every else None)) for index in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    click.echo(json.dumps({"wall_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
