"""The memory backend's sparse file contents against a flat bytearray model (hypothesis).

Every sequence of writes, holds (``fallocate``), truncations and punched holes must
read back exactly as the model does, count exactly the bytes its chunks hold, and
shorten a write that does not fit to the longest prefix that does.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from interposer.fuse_worker.backends._contents import CHUNK_BYTES, SparseContents

#: Offsets around chunk boundaries, where the off-by-ones live, and anywhere in 8 chunks.
OFFSETS = st.one_of(
    st.integers(0, 8 * CHUNK_BYTES),
    st.builds(lambda chunk, delta: max(chunk * CHUNK_BYTES + delta, 0), st.integers(0, 8), st.integers(-3, 3)),
)
LENGTHS = st.one_of(st.integers(1, 16), st.integers(1, 3 * CHUNK_BYTES), st.just(CHUNK_BYTES))
OPS = st.lists(st.tuples(st.sampled_from(["write", "hold", "truncate", "punch"]), OFFSETS, LENGTHS, st.integers(0, 255)),
               max_size=25)


def _stored(contents: SparseContents) -> int:
    return sum(len(chunk) for chunk in contents._chunks.values())


@settings(max_examples=300, deadline=None)
@given(OPS, OFFSETS, LENGTHS, st.integers(0, 4 * CHUNK_BYTES))
def test_sparse_contents_read_back_as_a_flat_file_would(ops, probe_offset, probe_length, room) -> None:
    contents, model, size = SparseContents(), bytearray(), 0
    for op, offset, length, byte in ops:
        end = offset + length
        if op in ("write", "hold"):
            expected_growth = contents.growth(offset, end)
            grown = (contents.write(offset, bytes([byte]) * length) if op == "write"
                     else contents.hold(offset, end))
            assert grown == expected_growth
            model.extend(bytes(max(end - len(model), 0)))
            if op == "write":
                model[offset:end] = bytes([byte]) * length
            size = max(size, end)
        elif op == "truncate":
            new_size = min(offset, size)
            contents.truncate(new_size)
            del model[new_size:]
            size = new_size
        elif offset < size:
            contents.punch(offset, min(end, size))
            model[offset:min(end, size)] = bytes(min(end, size) - offset)
        assert contents.stored == _stored(contents)
        assert contents.read(0, size) == bytes(model[:size]) + bytes(size - len(model[:size]))
    # A write that stores at most ``room`` new bytes: the longest prefix that fits.
    fits = contents.fitting(probe_offset, probe_length, room)
    assert 0 <= fits <= probe_length
    assert contents.growth(probe_offset, probe_offset + fits) <= room
    if fits < probe_length:
        assert contents.growth(probe_offset, probe_offset + fits + 1) > room
    # SEEK_DATA lands on a stored byte with only holes before it; SEEK_HOLE on an unstored one.
    if probe_offset < size:
        data = contents.next_data(probe_offset)
        stored_from = [i for i in range(probe_offset, size) if _is_stored(contents, i)]
        if stored_from:
            assert data == stored_from[0]
        else:
            assert data is None or data >= size  # only a hole up to the end of the file
        hole = contents.next_hole(probe_offset)
        assert not _is_stored(contents, hole) and all(_is_stored(contents, i) for i in range(probe_offset, hole))


def _is_stored(contents: SparseContents, offset: int) -> bool:
    index, within = divmod(offset, CHUNK_BYTES)
    chunk = contents._chunks.get(index)
    return chunk is not None and within < len(chunk)
