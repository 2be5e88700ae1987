"""The plugin's one-call write (``nbd_plugin/writepath.c``) against the Python path it stands in
for: the same writes, through the plugin's ``pwrite`` on one set of parts and through the
bracket zero and trim still use (``hook.begin``, the back end, ``hook.end``) on a twin set,
leave the same TEs, the same dirty-region marks, the same kept-aside blocks, the same bytes and
the same errors, with no write left in flight. The cases cover the common path and every way
back into Python: a keep-aside that needs the old bytes, a mark that fails, a write that fails,
an end that fails."""
import importlib
import os
import sys
import types

import pytest

from copier.keepaside import KeepAside
from nbd_plugin.backend import Backend
from replication import dirtylog
from replication.driver import WriteHook
from tracker import KIND_DATA, KIND_TRIM, KIND_ZERO, Tracker

KiB = 1 << 10
SIZE = 4 << 20
REGION = 64 * KiB
WRITES = [(0, 4 * KiB), (100 * KiB, 4 * KiB), (SIZE - 512, 512), (REGION - 100, 300),
          (3 << 20, 128 * KiB), (0, 4 * KiB)]


@pytest.fixture
def plugin(monkeypatch):
    """nbd_plugin.plugin imported beside a stand-in for nbdkit's module (nbdkit embeds the
    real one); its callbacks are called unwrapped, as the wrapper's thread-state keeping is
    for nbdkit's threads only."""
    fake = types.ModuleType("nbdkit")
    fake.FLAG_FUA, fake.set_error = 1 << 1, lambda err: None
    monkeypatch.setitem(sys.modules, "nbdkit", fake)
    monkeypatch.delitem(sys.modules, "nbd_plugin.plugin", raising=False)
    module = importlib.import_module("nbd_plugin.plugin")
    rest, module.handed_back = module._pwrite_rest, []

    def handed_back(h, rc, buf, offset):   # which way back into Python each write took
        module.handed_back.append(rc)
        return rest(h, rc, buf, offset)
    monkeypatch.setattr(module, "_pwrite_rest", handed_back)
    yield module
    sys.modules.pop("nbd_plugin.plugin", None)


class Twin:
    """One source with its tracker, keep-aside, dirty-region log and write hook."""

    def __init__(self, folder, data, readonly=False):
        os.makedirs(folder)
        path = os.path.join(folder, "disk.img")
        with open(path, "wb") as f:
            f.write(data)
        self.folder = folder
        self.backend = Backend(path, readonly=readonly)
        self.tracker = Tracker(shards=2)
        self.keepaside = KeepAside({0: self.backend})
        self.dirty = dirtylog.DirtyLog(folder, [types.SimpleNamespace(dev=0, name="d", size=SIZE)],
                                       REGION, self.tracker.cycle)
        self.hook = WriteHook(self.tracker, self.keepaside)
        self.hook.log_to(self.dirty)

    def write(self, plugin, merged, offset, data):
        """One write, through the one-call path or the Python one; the error it raised, or None."""
        plugin.hook = self.hook
        h = plugin.Handle(self.backend, 0)
        try:
            if merged:
                plugin.pwrite.__wrapped__(h, data, offset, 0)
            else:
                plugin._tracked(h, KIND_DATA, offset, len(data),
                                lambda: h.backend.pwrite(data, offset), 0)
        except Exception as e:   # noqa: BLE001 -- compared with the other path's
            return type(e), str(e).replace(self.folder, "")
        return None

    def arm(self):
        """Close the open cycle with the keep-aside armed on it, as an RP with a copy does:
        the next cycle's writes must keep the bytes they overwrite first."""
        self.keepaside.arm(self.tracker.cycle)
        return self.tracker.close_cycle(5.0, on_drained=self.keepaside.drained)

    def seen(self):
        """Everything a write leaves behind, once the open cycle is closed."""
        assert self.tracker.inflight == 0
        closed = self.tracker.close_cycle(5.0)
        tes = {kind: bytes(closed.entries(0, kind)) for kind in (KIND_DATA, KIND_ZERO, KIND_TRIM)}
        marks, _ = dirtylog.read(self.folder, self.dirty.describe())
        kept = {k: v for k, v in self.keepaside.stats().items() if k != "cycle"}
        with open(self.backend.path, "rb") as f:
            return tes, {name: list(pairs) for name, pairs in marks.items()}, kept, f.read()

    def close(self):
        self.hook.log_to(None)
        self.dirty.close()
        self.backend.close()


@pytest.fixture
def twins(tmp_path):
    made = []

    def make(**kw):
        data = os.urandom(SIZE)
        pair = [Twin(str(tmp_path / name), data, **kw) for name in ("merged", "python")]
        made.extend(pair)
        return pair
    yield make
    for twin in made:
        twin.close()


def both(plugin, merged, python, writes):
    """Run ``writes`` on each twin; returns the errors each raised."""
    errors = []
    for offset, length in writes:
        data = os.urandom(length)
        errors.append((merged.write(plugin, True, offset, data),
                       python.write(plugin, False, offset, data)))
    return [m for m, _ in errors], [p for _, p in errors]


def test_common_writes_leave_the_same_tes_marks_and_bytes(plugin, twins):
    merged, python = twins()
    errors = both(plugin, merged, python, WRITES)
    assert errors == ([None] * len(WRITES),) * 2
    assert plugin.handed_back == []   # all in one C call
    seen = merged.seen()
    assert seen == python.seen()
    tes, marks, _, _ = seen
    assert len(tes[KIND_DATA]) == 16 * len(WRITES) and marks["d"]


def test_a_write_that_must_keep_the_old_bytes_aside_goes_back_to_python(plugin, twins):
    merged, python = twins()
    both(plugin, merged, python, WRITES[:2])
    armed = [twin.arm() for twin in (merged, python)]
    assert bytes(armed[0].entries(0, KIND_DATA)) == bytes(armed[1].entries(0, KIND_DATA))
    assert both(plugin, merged, python, WRITES[1:4]) == ([None] * 3,) * 2
    assert plugin.handed_back == [plugin.io_lib.WP_BEGUN] * 3
    seen = merged.seen()
    assert seen == python.seen()
    assert seen[2]["kept_blocks_total"] > 0


def test_a_mark_that_fails_raises_as_the_python_path_does(plugin, twins):
    # Past the device's end: the dirty-region log refuses the mark, before anything is written.
    merged, python = twins()
    errors = both(plugin, merged, python, [(SIZE, 4 * KiB), (0, 4 * KiB)])
    assert errors[0] == errors[1] and errors[0][0][0] is ValueError and errors[0][1] is None
    assert plugin.handed_back == [plugin.io_lib.WP_BEGUN]
    assert merged.seen() == python.seen()


def test_a_write_that_fails_is_recorded_as_data_and_raises_as_the_python_path_does(plugin, twins):
    merged, python = twins(readonly=True)   # the write fails: EBADF
    errors = both(plugin, merged, python, WRITES[:2])
    assert errors[0] == errors[1] and errors[0][0][0] is OSError
    assert plugin.handed_back == [plugin.io_lib.WP_WRITE_FAILED] * 2
    seen = merged.seen()
    assert seen == python.seen() and len(seen[0][KIND_DATA]) == 16 * 2


def test_an_end_that_fails_raises_as_the_python_path_does(plugin, twins):
    # A write of no bytes is no TE: the tracker refuses it at the end, after the write. (The
    # dirty-region log would refuse to mark it first.)
    merged, python = twins()
    for twin in (merged, python):
        twin.hook.log_to(None)
    errors = both(plugin, merged, python, [(4 * KiB, 0), (8 * KiB, 4 * KiB)])
    assert errors[0] == errors[1] and errors[0][0][0] is ValueError and errors[0][1] is None
    assert plugin.handed_back == [plugin.io_lib.WP_END_FAILED]
    assert merged.seen() == python.seen()
