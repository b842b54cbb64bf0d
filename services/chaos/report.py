"""Chaos results for people: a markdown table (one row per fault) and a timeline PNG per scenario
(each request at its send time, its latency up the y axis, coloured by outcome; fault windows shaded)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.chaos.history import Event, pairs


def _f(v: Any, digits: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    head = ("| scenario | mode | fault | requests | ok | allowed fail | lost | wrong | once viol. | in flight | hit | "
            "failovers | fault->first good ms | extra p50 / max ms | avoid share | result |")
    lines = [head, "|" + "---|" * 16]
    for r in results:
        v = r["verdict"]
        faults = v["faults"] or [None]
        for i, f in enumerate(faults):
            first = i == 0
            verdict = ("PASS" if v["passed"] else "FAIL") if first else ""
            lines.append(
                f"| {r['name'] if first else ''} | {r['mode'] if first else ''} | {f['label'] if f else '(none)'} | "
                + (f"{v['requests']} | {v['ok']} | {v['failed_allowed']} | {v['lost']} | {v['wrong']} | "
                   f"{v['exactly_once_violations']} | " if first else "| | | | | | ")
                + (f"{f['in_flight']} | {f['hit']} | {f['failovers']} | {_f(f['first_good_ms'])} | "
                   f"{_f(f['extra_ms_p50'])} / {_f(f['extra_ms_max'])} | {_f(f['avoid_share'], 2)} | " if f else "| | | | | | ")
                + f"{verdict} |"
            )
    return "\n".join(lines)


def problems_list(results: Sequence[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        for p in r["verdict"]["problems"]:
            lines.append(f"- **{r['name']}**: {p}")
        if r.get("error"):
            lines.append(f"- **{r['name']}**: the run itself failed: {r['error']}")
    return "\n".join(lines) or "- none"


def plot_timeline(result: dict[str, Any], events: Sequence[Event], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    groups: dict[str, tuple[list[float], list[float]]] = {"ok": ([], []), "ok after failover": ([], []),
                                                            "failed": ([], []), "lost": ([], [])}
    end_of_run = max((e.time for e in events), default=1.0)
    for invoke, end in pairs(list(events)):
        if end is None:
            key, latency = "lost", 1000 * (end_of_run - invoke.time)
        else:
            latency = 1000 * (end.time - invoke.time)
            key = "failed" if end.type == "fail" else ("ok after failover" if end.attempts > 1 else "ok")
        groups[key][0].append(invoke.time)
        groups[key][1].append(max(latency, 0.1))
    colours = {"ok": "tab:green", "ok after failover": "tab:orange", "failed": "tab:red", "lost": "black"}
    for key, (xs, ys) in groups.items():
        if xs:
            ax.scatter(xs, ys, s=10, c=colours[key], label=f"{key} ({len(xs)})", marker="x" if key == "lost" else "o")
    for f in result["verdict"]["faults"]:
        ax.axvspan(f["at"], max(f["window_end"], f["at"] + 0.05), color="tab:purple", alpha=0.15)
        ax.text(f["at"], ax.get_ylim()[1] if ax.has_data() else 1, f["label"], fontsize=7, va="top", rotation=90)
    ax.set_yscale("log")
    ax.set_xlabel("time since load started (s)")
    ax.set_ylabel("request latency (ms)")
    ax.set_title(f"{result['name']}: {'PASS' if result['verdict']['passed'] else 'FAIL'} (shaded: fault windows)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
