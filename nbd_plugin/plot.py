"""``nbdrep plot``: lag and bytes per cycle over time, from the cycle history a server keeps in
its state directory (``replication.history``), to a PNG. Needs no running server.

matplotlib is imported only when a picture is drawn: pyplot takes a third of a second to
import. It comes from PyPI (pyproject), not Debian: Debian 12's python3-matplotlib 3.6 is built
for numpy 1, and the venv's numpy is 2 (and the two copies together break mpl_toolkits).
"""
import os
import time

from nbd_plugin.cli import default_state_dir
from nbd_plugin.params import parse_duration
from replication import history


class PlotError(ValueError):
    """Bad input: one line, exit status 2. A ValueError, which ``nbdrep``'s main catches even
    when nbd_plugin.cli runs as ``__main__`` (then its CLIError is another class than the one
    this module would see)."""


def add_parser(sub):
    p = sub.add_parser("plot", help="draw lag and bytes per cycle over time to a PNG, from the "
                                    "cycle history in the state directory")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png", help="the PNG to write")
    p.add_argument("--state", default=default_state_dir(), metavar="DIR",
                   help="the server's state directory (default: %(default)s)")
    p.add_argument("--since", metavar="DURATION",
                   help="only the cycles of the last DURATION (90s, 10m, 2h, 30d; default: all)")
    p.set_defaults(func=run)


def run(args, now=None):
    now = time.time() if now is None else now
    since = None
    if args.since is not None:
        seconds = parse_duration(args.since)
        if not seconds:
            raise PlotError(f"--since {args.since!r} is not a duration (e.g. 90s, 10m, 2h, 30d)")
        since = now - seconds
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise PlotError(f"-o {args.output}: directory {folder} does not exist")
    try:
        cycles = history.read(args.state, since)
    except history.HistoryError as e:
        raise PlotError(str(e)) from None
    if not cycles:
        raise PlotError(f"no cycles in the last {args.since} in {args.state}")
    draw(cycles, args.output)
    print(f"nbdrep: {len(cycles)} cycles, {_when(cycles[0]['rp_time'])} to "
          f"{_when(cycles[-1]['rp_time'])}, drawn to {args.output}")
    return 0


def draw(cycles, path):
    """Two panels sharing the time axis (the RP times): the lag at each commit, and the bytes
    each cycle sent (data and zeros); failed cycles are marked in both."""
    import datetime
    import io

    import matplotlib
    matplotlib.use("Agg")   # no display: a file only
    import matplotlib.pyplot as plt
    from matplotlib import dates

    def at(c):
        return datetime.datetime.fromtimestamp(c["rp_time"])

    marker = "." if len(cycles) <= 300 else None
    committed = [c for c in cycles if c["state"] != "failed"]
    fig, (lag_ax, bytes_ax) = plt.subplots(2, 1, sharex=True, figsize=(10, 6), dpi=100)
    lag_ax.plot([at(c) for c in committed], [c["lag"] for c in committed], marker=marker,
                linewidth=1, label="lag at commit")
    for label, colour, state in (("not a recovery point", "orange", "inconsistent"),
                                 ("failed", "red", "failed")):
        marked = [at(c) for c in cycles if c["state"] == state]
        for ax in (lag_ax, bytes_ax) if marked else ():
            ax.vlines(marked, 0, 1, transform=ax.get_xaxis_transform(), colors=colour,
                      alpha=0.4, linewidth=1, label=label if ax is lag_ax else None)
    lag_ax.set_ylabel("lag (s)")
    lag_ax.set_ylim(bottom=0)
    lag_ax.legend(loc="best", fontsize="small")
    lag_ax.set_title(f"nbdrep: {len(cycles)} cycles from {_when(cycles[0]['rp_time'])} "
                     f"to {_when(cycles[-1]['rp_time'])}")
    sent = [c["bytes_copied"] + c["bytes_zeroed"] for c in committed]
    unit, name = _unit(max(sent, default=0))   # ticks at round numbers of it, not of bytes
    bytes_ax.plot([at(c) for c in committed], [s / unit for s in sent], marker=marker,
                  linewidth=1, color="tab:green")
    bytes_ax.set_ylabel(f"{name} per cycle\n(copied + zeroed)")
    bytes_ax.set_ylim(bottom=0)
    bytes_ax.set_xlabel("recovery point (local time)")
    for ax in (lag_ax, bytes_ax):
        ax.grid(alpha=0.3)
    # Concise: seconds-long and days-long histories both get readable ticks.
    locator = dates.AutoDateLocator()
    bytes_ax.xaxis.set_major_locator(locator)
    bytes_ax.xaxis.set_major_formatter(dates.ConciseDateFormatter(locator))
    fig.tight_layout()
    png = io.BytesIO()   # drawn whole before the file is touched
    fig.savefig(png, format="png")
    plt.close(fig)
    with open(path, "wb") as f:
        f.write(png.getvalue())


def _unit(largest):
    """The binary unit (bytes, name) that shows ``largest`` as a number below 1024."""
    for power, name in enumerate(("bytes", "KiB", "MiB", "GiB", "TiB")):
        if largest < 1024 ** (power + 1):
            break
    return 1024 ** power, name


def _when(epoch):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
