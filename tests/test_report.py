"""reporter.report against a naive oracle: sets of byte offsets."""
import array

from hypothesis import given, settings, strategies as st

from reporter import report as reports
from tracker import KIND_DATA, KIND_TRIM, KIND_ZERO, Tracker

KINDS = (KIND_DATA, KIND_ZERO, KIND_TRIM)
SIZES = {0: 3000, 1: 1537}

te = st.tuples(st.sampled_from(sorted(SIZES)), st.sampled_from(KINDS),
               st.integers(0, 3500), st.integers(1, 400))
extent = st.tuples(st.integers(0, 3500), st.integers(1, 400))


def byte_set(pairs):
    return {b for o, n in zip(pairs[0::2], pairs[1::2]) for b in range(o, o + n)}


def check_shape(pairs, size):
    """Ascending, disjoint, non-adjacent, within the device."""
    end = -1
    for o, n in zip(pairs[0::2], pairs[1::2]):
        assert n > 0 and o > end and o + n <= size, (o, n, end, size)
        end = o + n


def closed_cycle(tes):
    tracker = Tracker(shards=1)
    for dev, kind, off, n in tes:
        tracker.record(dev, kind, off, n)
    return tracker.close_cycle()


def carry_report(data, zero):
    return reports.Report({0: reports.merge(reports.pack(data))} if data else {},
                          {0: reports.merge(reports.pack(zero))} if zero else {})


@settings(max_examples=300, deadline=None)
@given(tes=st.lists(te, max_size=25), carry_data=st.lists(extent, max_size=5),
       carry_zero=st.lists(extent, max_size=5), zeros_as_data=st.booleans())
def test_build_is_the_union_clipped_with_zeros_no_data_write_touched(tes, carry_data, carry_zero,
                                                                     zeros_as_data):
    carry = carry_report(carry_data, carry_zero)
    report = reports.build(closed_cycle(tes), SIZES, KINDS, carry, zeros_as_data=zeros_as_data)
    for dev, size in SIZES.items():
        data = {b for d, k, o, n in tes if d == dev and (k == KIND_DATA or zeros_as_data)
                for b in range(o, o + n)}
        zero = {b for d, k, o, n in tes if d == dev and k != KIND_DATA and not zeros_as_data
                for b in range(o, o + n)}
        if dev == 0:
            data |= {b for o, n in carry_data for b in range(o, o + n)}
            zero |= {b for o, n in carry_zero for b in range(o, o + n)}
        inside = set(range(size))
        check_shape(report.data_of(dev), size)
        check_shape(report.zero_of(dev), size)
        assert byte_set(report.data_of(dev)) == data & inside
        assert byte_set(report.zero_of(dev)) == (zero - data) & inside


@settings(max_examples=200, deadline=None)
@given(tes=st.lists(te, min_size=1, max_size=25), cap=st.integers(1, 4))
def test_past_the_cap_the_report_is_coarser_all_data_and_never_smaller(tes, cap):
    report = reports.build(closed_cycle(tes), SIZES, KINDS, cap=cap)
    for dev, size in SIZES.items():
        written = {b for d, k, o, n in tes if d == dev for b in range(o, min(o + n, size))}
        pairs = report.data_of(dev)
        check_shape(pairs, size)
        if (len(pairs) + len(report.zero_of(dev))) // 2 > cap:
            raise AssertionError(f"{len(pairs) // 2} extents over the cap of {cap}")
        assert written <= byte_set(pairs) | byte_set(report.zero_of(dev))


@settings(max_examples=200, deadline=None)
@given(data=st.lists(extent, max_size=8), zero=st.lists(extent, max_size=8),
       landed=st.lists(extent, max_size=8))
def test_minus_leaves_exactly_what_did_not_land(data, zero, landed):
    report = carry_report(data, zero)
    left = report.minus({0: reports.merge(reports.pack(landed))})
    gone = {b for o, n in landed for b in range(o, o + n)}
    assert byte_set(left.data_of(0)) == byte_set(report.data_of(0)) - gone
    assert byte_set(left.zero_of(0)) == byte_set(report.zero_of(0)) - gone
    assert not report.minus({0: reports.pack([(0, 4000)])})


def test_a_coarsened_te_past_the_end_of_the_device_is_clipped():
    """Issue 8, bug 2: the tracker coarsens to 64 KiB granules under its memory cap; on a
    device whose size is not a multiple of that, the last TE ran past EOF and the copy
    failed with EIO forever."""
    size = 3 * 65536 + 1000
    tracker = Tracker(shards=1, max_bytes=16 * 24)
    for i in range(40):
        tracker.record(0, KIND_DATA, size - 1 - 997 * i, 1)
    closed = tracker.close_cycle()
    assert closed.granule >= 65536, "the tracker coarsened"
    pairs = reports.build(closed, {0: size}, KINDS).data_of(0)
    check_shape(pairs, size)
    assert pairs[-2] + pairs[-1] == size


def test_coarsen_rounds_out_clips_and_never_drops_a_byte():
    MiB = 1 << 20
    extents = [(i * 100_000, 10) for i in range(50)] + [(8 * MiB - 7, 7)]
    out = reports.coarsen(reports.pack(extents), 8 * MiB, cap=4)
    assert len(out) // 2 <= 4
    assert out[-2] + out[-1] == 8 * MiB
    assert byte_set(reports.pack(extents)) <= byte_set(out)


def test_json_edge_and_counts():
    report = reports.Report({0: array.array("Q", [0, 10, 20, 5])}, {1: array.array("Q", [100, 50])})
    assert report.extent_count() == 3 and report.byte_count() == 65
    assert report.as_json({0: "a", 1: "b"}) == {"a": {"data": [(0, 10), (20, 5)], "zero": []},
                                               "b": {"data": [], "zero": [(100, 50)]}}
    assert not reports.Report({0: array.array("Q")})
