"""Part/frame format: round trips, torn tails, bit flips, recovery, byte shuffle."""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradexp import CorruptPartError
from gradexp.core import format as F

HYP = settings(max_examples=60, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- helpers ------------------------------------------------------------------------------


def frame_specs(max_frames: int = 6, max_payload: int = 1500, min_frames: int = 0):
    keys = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
    steps = st.tuples(st.integers(-2**63, 2**63 - 1), st.integers(-2**63, 2**63 - 1)).map(sorted)
    payload = st.one_of(
        st.binary(max_size=max_payload),
        # compressible payloads too (zstd then emits compressed blocks, not raw ones)
        st.tuples(st.binary(min_size=1, max_size=8), st.integers(1, 200)).map(lambda t: t[0] * t[1]),
    )
    spec = st.tuples(st.sampled_from([F.KIND_HISTORY, F.KIND_TENSOR]), payload, keys, steps,
                     st.integers(0, 2**32 - 1), st.sampled_from([0, 0, 2, 3, 4, 8]))
    return st.lists(spec, min_size=min_frames, max_size=max_frames)


def write_part(folder: Path, specs, *, stream: str = "t", seq: int = 0):
    """Write ``specs`` with PartWriter (not sealed); return (writer, infos, raws)."""
    w = F.PartWriter(folder, stream, seq)
    infos, raws = [], []
    for kind, raw, key, (smin, smax), rows, elem in specs:
        header, payload = F.encode_frame(kind, raw, key=key, step_min=smin, step_max=smax,
                                         rows=rows, shuffle_elem=elem)
        info = w.append(kind, header, payload, step_min=smin, step_max=smax, rows=rows, key=key,
                        raw=len(raw), filt=F.FILTER_SHUFFLE if elem > 1 else F.FILTER_NONE,
                        elem=max(elem, 1))
        assert info.end == w.size
        infos.append(info)
        raws.append(bytes(raw))
    return w, infos, raws


def read_bytes(path: Path, info: F.FrameInfo) -> bytes:
    out = F.read_frame(path, info)
    assert out.dtype == np.uint8 and out.size == info.raw
    return out.tobytes()


def assert_reads(path: Path, infos, raws) -> None:
    for info, raw in zip(infos, raws):
        assert read_bytes(path, info) == raw


def small_specs(n: int = 4, seed: int = 0):
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        raw = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40))) + b"ab" * rng.randint(0, 30)
        specs.append((F.KIND_TENSOR if i % 2 else F.KIND_HISTORY, raw, f"k{i}" * (i % 3),
                      (i, i + 2), i + 1, [0, 4, 2, 3][i % 4]))
    return specs


# -- round trips ----------------------------------------------------------------------------


@HYP
@given(specs=frame_specs())
def test_roundtrip_open_and_sealed(specs):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        w, infos, raws = write_part(folder, specs)
        for info, (kind, raw, key, (smin, smax), rows, elem) in zip(infos, specs):
            assert (info.kind, info.key, info.step_min, info.step_max, info.rows, info.raw) == \
                (kind, key, smin, smax, rows, len(raw))
            assert info.filter == (F.FILTER_SHUFFLE if elem > 1 else F.FILTER_NONE)

        # Open part: indexed by walking headers.
        scan = F.scan_part(w.path)
        assert not scan.sealed and scan.damage == []
        assert scan.frames == infos
        assert scan.valid_end == w.size == w.path.stat().st_size
        assert_reads(w.path, infos, raws)

        # Sealed part: indexed from its index frame.
        sealed = w.seal()
        assert sealed == folder / "t-000000.gxp" and not w.path.exists()
        scan = F.scan_part(sealed)
        assert scan.sealed and scan.damage == [] and scan.frames == infos
        assert_reads(sealed, infos, raws)

        # The same sealed bytes walked (as if the index were unreadable) give the same frames.
        walked = folder / "copy-000000.gxp.open"
        shutil.copyfile(sealed, walked)
        scan = F.scan_part(walked)
        assert scan.damage == [] and scan.frames == infos
        # ...which is also what a crash between writing the index and the rename leaves.
        resealed = F.recover_part(walked)
        assert resealed.read_bytes() == sealed.read_bytes()


# -- torn tails -----------------------------------------------------------------------------


def check_cut(folder: Path, data: bytes, cut: int, infos, raws, *, recover: bool) -> None:
    path = folder / "t-000000.gxp.open"
    path.write_bytes(data[:cut])
    expect = [i for i in infos if i.end <= cut]
    scan = F.scan_part(path)  # never raises
    assert scan.frames == expect, cut
    if cut == 0 or cut >= len(F.MAGIC_PART):
        assert scan.damage == [], cut  # a torn tail of an open part is not damage
    if cut >= len(F.MAGIC_PART):
        assert scan.valid_end == (expect[-1].end if expect else len(F.MAGIC_PART))
    assert_reads(path, expect, raws)
    if recover:
        sealed = F.recover_part(path)
        assert sealed == folder / "t-000000.gxp" and not path.exists()
        scan = F.scan_part(sealed)
        assert scan.sealed and scan.damage == [] and scan.frames == expect, cut
        assert_reads(sealed, expect, raws)
        sealed.unlink()


def test_truncation_at_every_offset(tmp_path):
    w, infos, raws = write_part(tmp_path, small_specs(4))
    w.close()
    data = w.path.read_bytes()
    w.path.unlink()
    assert len(data) < 1000
    for cut in range(len(data) + 1):
        check_cut(tmp_path, data, cut, infos, raws, recover=cut % 7 == 0 or cut > len(data) - 3)


@HYP
@given(specs=frame_specs(max_frames=10, max_payload=4000), data=st.data())
def test_truncation_random_offsets(specs, data):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        w, infos, raws = write_part(folder, specs)
        w.close()
        blob = w.path.read_bytes()
        w.path.unlink()
        cuts = data.draw(st.lists(st.integers(0, len(blob)), min_size=1, max_size=5))
        for cut in cuts:
            check_cut(folder, blob, cut, infos, raws, recover=True)


def test_recover_empty_open_part(tmp_path):
    """A crash between creating a part and writing its magic leaves a 0-byte ``.open`` file."""
    path = tmp_path / "t-000003.gxp.open"
    path.write_bytes(b"")
    assert F.scan_part(path).frames == []
    sealed = F.recover_part(path)
    scan = F.scan_part(sealed)
    assert scan.sealed and scan.frames == [] and scan.damage == []


def test_recover_keeps_frames_and_next_writer_continues(tmp_path):
    w, infos, raws = write_part(tmp_path, small_specs(3))
    w.close()
    with open(w.path, "ab") as f:
        f.write(b"GXFR\x02garbage")  # torn start of a fourth frame
    sealed = F.recover_part(w.path)
    scan = F.scan_part(sealed)
    assert scan.sealed and scan.frames == infos and scan.damage == []
    assert_reads(sealed, infos, raws)


# -- bit flips ------------------------------------------------------------------------------


def check_flip(folder: Path, name: str, data: bytes, pos: int, bit: int, infos, raws) -> F.PartScan:
    path = folder / name
    blob = bytearray(data)
    blob[pos] ^= 1 << bit
    path.write_bytes(bytes(blob))
    scan = F.scan_part(path)  # never raises
    hit = [i for i in infos if i.offset <= pos < i.end]
    for info in infos:
        if info not in hit:
            assert info in scan.frames, (pos, bit, info)  # undamaged frames are all found
    for info in scan.frames:
        assert info in infos, (pos, bit, info)  # no phantom frames
        raw = raws[infos.index(info)]
        try:
            got = read_bytes(path, info)
        except CorruptPartError:
            assert info in hit, (pos, bit)  # only the flipped frame may fail to decode
            continue
        assert got == raw, (pos, bit, info)  # never wrong bytes
    return scan


def test_bit_flip_every_byte_of_sealed_part(tmp_path):
    w, infos, raws = write_part(tmp_path, small_specs(3, seed=1))
    sealed = w.seal()
    data = sealed.read_bytes()
    rng = random.Random(5)
    for pos in range(len(data)):
        check_flip(tmp_path, "t-000001.gxp", data, pos, rng.randrange(8), infos, raws)


@HYP
@given(specs=frame_specs(min_frames=1, max_frames=6), data=st.data())
def test_bit_flips_sealed_random(specs, data):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        w, infos, raws = write_part(folder, specs)
        blob = w.seal().read_bytes()
        for _ in range(4):
            pos = data.draw(st.integers(0, len(blob) - 1))
            bit = data.draw(st.integers(0, 7))
            check_flip(folder, "t-000001.gxp", blob, pos, bit, infos, raws)
            # The same damage in an open part (walked, no index to lean on).
            cut = infos[-1].end
            if pos < cut:
                check_flip(folder, "t-000002.gxp.open", blob[:cut], pos, bit, infos, raws)


@pytest.mark.parametrize("victim", [0, 1, 2])
def test_header_flip_resyncs(tmp_path, victim):
    """Every single-bit flip in a frame header: that frame is reported damaged, all others found."""
    w, infos, raws = write_part(tmp_path, small_specs(4, seed=2))
    w.close()
    data = w.path.read_bytes()
    bad = infos[victim]
    nxt = infos[victim + 1].offset
    path = tmp_path / "v-000000.gxp.open"
    for pos in range(bad.offset, bad.data_offset):
        for bit in range(8):
            blob = bytearray(data)
            blob[pos] ^= 1 << bit
            path.write_bytes(bytes(blob))
            scan = F.scan_part(path)
            where = (pos - bad.offset, bit)
            assert scan.frames == infos[:victim] + infos[victim + 1:], where
            assert len(scan.damage) == 1, where
            d = scan.damage[0]
            assert (d.offset, d.length) == (bad.offset, nxt - bad.offset), where
            assert_reads(path, scan.frames, raws[:victim] + raws[victim + 1:])


def test_payload_flip_raises_corrupt(tmp_path):
    w, infos, raws = write_part(tmp_path, [(F.KIND_TENSOR, bytes(range(256)) * 8, "g", (0, 0), 1, 4)])
    sealed = w.seal()
    blob = bytearray(sealed.read_bytes())
    blob[infos[0].data_offset + infos[0].stored // 2] ^= 0x10
    sealed.write_bytes(bytes(blob))
    scan = F.scan_part(sealed)
    assert scan.frames == infos and scan.damage == []
    with pytest.raises(CorruptPartError) as e:
        F.read_frame(sealed, infos[0])
    assert isinstance(e.value, ValueError) and e.value.offset == infos[0].offset


# -- byte shuffle -------------------------------------------------------------------------------


def test_shuffle_layout():
    src = bytes([1, 2, 3, 4, 5, 6, 7])
    assert F.shuffle(src, 2).tobytes() == bytes([1, 3, 5, 2, 4, 6, 7])
    assert F.shuffle(src, 3).tobytes() == bytes([1, 4, 2, 5, 3, 6, 7])
    assert F.shuffle(src, 8).tobytes() == src  # shorter than one element: left as is


@HYP
@given(raw=st.binary(max_size=300), elem=st.integers(2, 16))
def test_shuffle_roundtrip(raw, elem):
    shuffled = F.shuffle(raw, elem)
    assert shuffled.size == len(raw)
    assert sorted(shuffled.tobytes()) == sorted(raw)
    assert F.unshuffle(shuffled, elem).tobytes() == raw
    header, payload = F.encode_frame(F.KIND_TENSOR, raw, key="x", shuffle_elem=elem)
    info = F.parse_header(header + payload, 0, len(header) + len(payload))
    assert info.filter == F.FILTER_SHUFFLE and info.elem == elem
    assert F.decode_payload(info, payload).tobytes() == raw
    assert F.decode_payload(info, payload, reuse=True).tobytes() == raw


@pytest.mark.parametrize("elem", [0, 4])
def test_reuse_decodes_into_one_buffer_per_thread_up_to_a_size(monkeypatch, elem):
    """With ``reuse`` successive frames decode into the same memory (nothing fresh to fault
    in per frame), except frames over REUSE_MAX_BYTES: those get memory of their own, which
    a thread does not keep."""
    rng = np.random.default_rng(1)
    raws = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (4000, 3000, 4000)]
    frames = []
    for raw in raws:
        header, payload = F.encode_frame(F.KIND_TENSOR, raw, key="x", shuffle_elem=elem)
        frames.append((F.parse_header(header + payload, 0, len(header) + len(payload)), payload))
    first = F.decode_payload(*frames[0], reuse=True)
    assert first.tobytes() == raws[0]
    second = F.decode_payload(*frames[1], reuse=True)
    assert second.tobytes() == raws[1] and np.shares_memory(first, second)
    monkeypatch.setattr(F, "REUSE_MAX_BYTES", 3999)
    own = F.decode_payload(*frames[2], reuse=True)
    assert own.tobytes() == raws[2] and not np.shares_memory(own, second)
    assert second.tobytes() == raws[1]


def test_payload_compressed_into_a_buffer_too_small_still_decodes():
    """A payload compressed into a caller's buffer spills what does not fit into a second
    piece; written together they are one intact frame."""
    raw = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    header, payload = F.encode_frame(F.KIND_TENSOR, raw, key="x", shuffle_elem=4,
                                     into=lambda n: np.empty(1000, np.uint8))
    assert isinstance(payload, list) and len(payload[0]) == 1000
    data = b"".join(bytes(p) for p in payload)
    info = F.parse_header(header + data, 0, len(header) + len(data))
    assert info.stored == len(data)
    assert F.decode_payload(info, data).tobytes() == raw


def test_large_tensor_payloads_reuse_pool_buffers(tmp_path):
    import gradexp

    xs = [np.random.default_rng(i).standard_normal(400_000).astype(np.float32) for i in range(3)]
    with gradexp.init("p", dir=tmp_path) as run:
        for x in xs:
            run.log({"w": x})
    r = gradexp.Api().run(run.dir)
    for i, x in enumerate(xs):
        assert r.tensor("w", i).tobytes() == x.tobytes()
    assert not r.damage
