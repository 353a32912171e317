"""Turn measured rows into results.csv, scaling.csv, results.md and the plots."""

from __future__ import annotations

import csv
import math
import os
from typing import Dict, List, Optional

import workloads as W


def _cfg(row: Dict) -> W.Config:
    return W.Config(row["config"], row["batch"], row["embed_dim"], tuple(row["spatial"]), row["instances"])


def derive(rows: List[Dict], meta: Dict) -> List[Dict]:
    """Add floor bytes, achieved bandwidth, fraction of copy bandwidth and the
    speedup of discloss over each row's implementation."""
    copy_bw = max(meta["copy_bw"])
    label_dtype = W.LABEL_DTYPES[meta["label_dtype"]]
    times = {(r["config"], r["dtype"], r["pass_"], r["impl"]): r.get("median_s")
             for r in rows if r["status"] == "ok"}
    for r in rows:
        cfg = _cfg(r)
        dtype = W.DTYPES[r["dtype"]]
        r["floor_bytes"] = W.floor_bytes(cfg, dtype, label_dtype, r["pass_"])
        r["input_bytes"] = cfg.embedding_bytes(dtype) + cfg.batch * cfg.pixels * W._itemsize(label_dtype)
        t = r.get("median_s") if r["status"] == "ok" else None
        if t:
            r["achieved_Bps"] = r["floor_bytes"] / t
            r["frac_copy"] = r["achieved_Bps"] / copy_bw
            r["floor_ratio"] = t / (r["floor_bytes"] / copy_bw)  # time / time of the floor at copy speed
            t_d = times.get((r["config"], r["dtype"], r["pass_"], "discloss"))
            r["discloss_speedup"] = t / t_d if t_d else None
    return rows


CSV_FIELDS = ["device", "config", "batch", "embed_dim", "spatial", "instances", "dtype", "label_dtype", "pass",
              "impl", "status", "median_ms", "iqr_ms", "runs", "peak_mib", "retained_mib", "input_mib", "floor_mb",
              "achieved_gbps", "frac_copy_bw", "floor_ratio", "discloss_speedup", "first_call_s", "build", "note"]


def _num(v, scale=1.0, digits=4):
    if v is None:
        return ""
    return f"{v * scale:.{digits}g}"


def write_csv(path: str, rows: List[Dict], meta: Dict, extra: Optional[List[str]] = None) -> None:
    fields = (extra or []) + CSV_FIELDS
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({
                "sweep": r.get("sweep", ""), "device": meta["slug"], "config": r["config"], "batch": r["batch"],
                "embed_dim": r["embed_dim"], "spatial": "x".join(map(str, r["spatial"])),
                "instances": r["instances"], "dtype": r["dtype"], "label_dtype": meta["label_dtype"],
                "pass": r["pass_"], "impl": r["impl"], "status": r["status"],
                "median_ms": _num(r.get("median_s"), 1e3), "iqr_ms": _num(r.get("iqr_s"), 1e3, 3),
                "runs": r.get("runs", ""), "peak_mib": _num(r.get("peak_bytes"), 2**-20),
                "retained_mib": _num(r.get("retained_bytes"), 2**-20),
                "input_mib": _num(r.get("input_bytes"), 2**-20), "floor_mb": _num(r.get("floor_bytes"), 1e-6),
                "achieved_gbps": _num(r.get("achieved_Bps"), 1e-9, 3), "frac_copy_bw": _num(r.get("frac_copy"), 1, 3),
                "floor_ratio": _num(r.get("floor_ratio"), 1, 3),
                "discloss_speedup": _num(r.get("discloss_speedup"), 1, 3),
                "first_call_s": _num(r.get("first_call_s"), 1, 3), "build": r.get("build", ""),
                "note": r.get("note", ""),
            })


# --------------------------------------------------------------------------
# markdown


def _ms(r: Optional[Dict]) -> str:
    if r is None:
        return "—"
    if r["status"] != "ok":
        return r["status"]
    t = r["median_s"] * 1e3
    return f"{t:.3g}" if t < 1000 else f"{t:,.0f}"


def _speed(r: Optional[Dict]) -> str:
    if r is None or r["status"] != "ok" or r.get("discloss_speedup") is None:
        return "—"
    return f"{r['discloss_speedup']:.2g}×" if r["discloss_speedup"] < 10 else f"{r['discloss_speedup']:.0f}×"


def _mib(r: Optional[Dict]) -> str:
    if r is None or r["status"] != "ok" or r.get("peak_bytes") is None:
        return "—" if r is None or r["status"] == "ok" else "skipped"
    return f"{r['peak_bytes'] / 2**20:,.0f}"


def _md_table(header: List[str], body: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def markdown(meta: Dict, rows: List[Dict], sweep_rows: List[Dict], plots: List[str]) -> str:
    impls = [i for i in W.IMPLS if any(r["impl"] == i for r in rows + sweep_rows)]
    baselines = [i for i in impls if i != "discloss"]
    short = {"discloss": "discloss", "ref_eager": "ref eager", "ref_compiled": "ref compiled", "loop": "loop"}
    info = meta["info"]
    bw = meta["copy_bw"]
    builds = sorted({r["build"] for r in rows + sweep_rows if r.get("build")})
    build_line = ", ".join(builds) if builds else "unknown"
    if len(builds) > 1:
        build_line += " — **the extension was rebuilt during this run; the CSV's build column says which rows used which**"
    lines = [f"# discloss benchmark: {meta['slug']} ({meta['mode']} mode)", ""]
    lines += _md_table(["", ""], [[k, v] for k, v in info.items()] + [
        ["discloss build (UTC mtime of _C)", build_line],
        ["copy bandwidth", f"{bw[0] / 1e9:.1f} GB/s at the start, {bw[1] / 1e9:.1f} GB/s at the end "
                           f"(dst.copy_(src) of {meta['copy_bytes'] >> 20} MiB, read + write); "
                           f"fractions use the higher"],
        ["load average (1, 5, 15 min)", f"start {meta['load_start']}, end {meta['load_end']}"],
        ["labels", f"{meta['label_dtype']}, jittered-grid Voronoi blobs, ~25-35% background (label 0)"],
        ["budgets", f"{meta['plan']['time_budget_s']:g} s per call, "
                    f"{meta['plan']['mem_budget_bytes'] / 2**30:.1f} GiB predicted peak"],
        ["command", f"python benchmarks/bench.py {meta['argv']}".strip()],
        ["run time", f"{meta['elapsed_s'] / 60:.1f} min"],
    ])
    lines += ["", "Times are medians after warm-up; `fwd` is the forward pass under `torch.no_grad()`, "
              "`fwdbwd` is forward + `torch.autograd.grad` of var + dist + reg. "
              "`× X` is how many times faster discloss is than X (X's time / discloss's time). "
              "See benchmarks/README.md for the measures.", ""]

    by_key = {(r["config"], r["dtype"], r["pass_"], r["impl"]): r for r in rows}
    cases = []
    for r in rows:
        key = (r["config"], r["dtype"], r["pass_"])
        if key not in cases:
            cases.append(key)
    if cases:
        lines += ["## Time (ms, median) and speedup of discloss", ""]
        header = ["config", "B×E×spatial, K", "dtype", "pass"] + [short[i] for i in impls] + \
                 [f"× {short[b]}" for b in baselines]
        body = []
        for cfg_name, dtype, pass_ in cases:
            r0 = by_key.get((cfg_name, dtype, pass_, "discloss")) or next(
                r for r in rows if (r["config"], r["dtype"], r["pass_"]) == (cfg_name, dtype, pass_))
            shape = f"{r0['batch']}×{r0['embed_dim']}×{'×'.join(map(str, r0['spatial']))}, {r0['instances']}"
            body.append([cfg_name, shape, dtype, pass_]
                        + [_ms(by_key.get((cfg_name, dtype, pass_, i))) for i in impls]
                        + [_speed(by_key.get((cfg_name, dtype, pass_, b))) for b in baselines])
        lines += _md_table(header, body)

        lines += ["", "## Bandwidth and peak memory", "",
                  "Floor: the bytes any implementation must move (fwd: 2 reads of the embeddings + 1 of the "
                  "labels; fwdbwd: 3 reads + 1 write of the embeddings + 3 reads of the labels). "
                  "GB/s = floor / discloss's time; % copy = that over the copy bandwidth above; "
                  "× floor = discloss's time over the time the floor takes at copy bandwidth (1 is ideal). "
                  "Peak memory: MiB needed on top of the inputs during one warm call, counted from before "
                  "the implementation's first call, so memory kept between calls (discloss's CPU gradient "
                  "buffer cache, torch.compile's code) counts; the fwdbwd figure includes the gradient, "
                  "the size of the embeddings.", ""]
        header = ["config", "dtype", "pass", "floor MB", "discloss GB/s", "% copy", "× floor"] + \
                 [f"peak MiB {short[i]}" for i in impls]
        body = []
        for cfg_name, dtype, pass_ in cases:
            d = by_key.get((cfg_name, dtype, pass_, "discloss"))
            ok = d is not None and d["status"] == "ok"
            floor = (d or {}).get("floor_bytes") or next(
                r["floor_bytes"] for r in rows if (r["config"], r["dtype"], r["pass_"]) == (cfg_name, dtype, pass_))
            body.append([cfg_name, dtype, pass_, f"{floor / 1e6:,.0f}",
                         f"{d['achieved_Bps'] / 1e9:.2f}" if ok else "—",
                         f"{100 * d['frac_copy']:.0f}%" if ok else "—",
                         f"{d['floor_ratio']:.1f}" if ok else "—"]
                        + [_mib(by_key.get((cfg_name, dtype, pass_, i))) for i in impls])
        lines += _md_table(header, body)

    for sweep, xname in (("pixels", "pixels"), ("K", "K")):
        srows = [r for r in sweep_rows if r.get("sweep") == sweep]
        if not srows:
            continue
        xs = sorted({_sweep_x(r, sweep) for r in srows})
        s_impls = [i for i in impls if any(r["impl"] == i for r in srows)]
        fixed = ("1 image, E=16, K=64 instances, square 2D, float32, fwdbwd" if sweep == "pixels"
                 else "1 image, E=16, 512×512, float32, fwdbwd")
        lines += ["", f"## Scaling with {xname} ({fixed}): time ms (peak MiB)", ""]
        by = {(_sweep_x(r, sweep), r["impl"]): r for r in srows}
        body = []
        for x in xs:
            cells = []
            for i in s_impls:
                r = by.get((x, i))
                if r is None:
                    cells.append("—")
                elif r["status"] != "ok":
                    cells.append(r["status"])
                else:
                    cells.append(f"{_ms(r)} ({r['peak_bytes'] / 2**20:,.0f})")
            body.append([f"{x:,}"] + cells)
        lines += _md_table([xname] + [short[i] for i in s_impls], body)

    for p in plots:
        lines += ["", f"![{os.path.splitext(p)[0]}]({p})"]

    notes = [r for r in rows + sweep_rows if r["status"] != "ok"]
    if notes:
        lines += ["", "## Not measured", ""]
        for r in notes:
            where = f"{r.get('sweep', '')} sweep " if r.get("sweep") else ""
            lines.append(f"- {where}{r['config']} {r['dtype']} {r['pass_']} {r['impl']}: "
                         f"{r['status']} — {r.get('note', '')}")
    return "\n".join(lines) + "\n"


def _sweep_x(r: Dict, sweep: str) -> int:
    if sweep == "pixels":
        return r["batch"] * math.prod(r["spatial"])
    return r["instances"]


# --------------------------------------------------------------------------
# plots

_STYLE = {
    "discloss": dict(color="tab:red", marker="o"),
    "ref_eager": dict(color="tab:blue", marker="s"),
    "ref_compiled": dict(color="tab:green", marker="^"),
    "loop": dict(color="tab:gray", marker="x"),
}


def plot_sweep(path: str, sweep_rows: List[Dict], sweep: str, meta: Dict) -> bool:
    srows = [r for r in sweep_rows if r.get("sweep") == sweep]
    if not srows:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4.4))
    for impl in W.IMPLS:
        pts = sorted((_sweep_x(r, sweep), r) for r in srows if r["impl"] == impl)
        if not pts:
            continue
        ok = [(x, r) for x, r in pts if r["status"] == "ok"]
        skipped = [x for x, r in pts if r["status"] != "ok"]
        label = W.IMPL_TITLES[impl] + (f" (not run from {min(skipped):,})" if skipped else "")
        if ok:
            ax_t.plot([x for x, _ in ok], [r["median_s"] * 1e3 for _, r in ok], label=label, **_STYLE[impl])
            ax_m.plot([x for x, _ in ok], [max(r["peak_bytes"], 1) / 2**20 for _, r in ok], label=label,
                      **_STYLE[impl])
    if sweep == "pixels":
        d = sorted((_sweep_x(r, sweep), r["median_s"]) for r in srows
                   if r["impl"] == "discloss" and r["status"] == "ok")
        if d:
            x_last, t_last = d[-1]
            xs = [x for x, _ in d]
            ax_t.plot(xs, [t_last * 1e3 * x / x_last for x in xs], ls=":", color="k", lw=1,
                      label="linear (through discloss's largest)")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel("pixels" if sweep == "pixels" else "instances K")
    ax_t.set_ylabel("time, ms (median)")
    ax_m.set_ylabel("peak memory above inputs, MiB")
    fixed = "1 image, E=16, K=64" if sweep == "pixels" else "1 image, E=16, 512×512"
    fig.suptitle(f"forward+backward, float32, {fixed} — {meta['slug']}", fontsize=10)
    handles, labels = ax_t.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def write_all(out: str, meta: Dict, rows: List[Dict], sweep_rows: List[Dict], plots: bool = True) -> None:
    rows = derive(rows, meta)
    sweep_rows = derive(sweep_rows, meta)
    write_csv(os.path.join(out, "results.csv"), rows, meta)
    if sweep_rows:
        write_csv(os.path.join(out, "scaling.csv"), sweep_rows, meta, extra=["sweep"])
    made = []
    if plots:
        for sweep, name in (("pixels", "scaling_pixels.png"), ("K", "scaling_k.png")):
            try:
                if plot_sweep(os.path.join(out, name), sweep_rows, sweep, meta):
                    made.append(name)
            except ImportError:
                print("matplotlib is not installed: no plots (pip install matplotlib)", flush=True)
                break
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(meta, rows, sweep_rows, made))

