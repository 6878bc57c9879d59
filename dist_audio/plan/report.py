"""Show a ``Plan``: a text table for people, JSON for tools, a stacked bar chart for the eyes."""

from __future__ import annotations

import json
from pathlib import Path

from dist_audio.plan.planner import GIB, Plan, Row

PARTS = ("params", "grads", "optimizer", "activations", "temporary")
_LABELS = {"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "zero3_offload": "ZeRO-3+offload",
           "fsdp": "FSDP", "fsdp_offload": "FSDP+offload"}


def _describe(row: Row) -> str:
    return f"{_LABELS[row.strategy]}, checkpointing {row.activation_checkpointing}, {row.precision}"


def format_text(plan: Plan) -> str:
    """The table and the answer, as printed by ``launch/plan.py``."""
    i = plan.inputs
    lines = [
        f"{i['config']}: {i['model']}, {i['parameters']:,} parameters ({i['blocks']} blocks, largest "
        f"{i['largest_block_parameters']:,}); micro-batch {i['micro_batch']} × {i['segment_seconds']} s "
        f"({i['length']:,} steps at {i['samples_per_second']:g}/s)",
        f"cluster: {i['nodes']} node(s) × {i['gpus']} GPU(s) × {i['gpu_memory_gib']:g} GiB; fits = peak ≤ "
        f"{i['budget_gib']:g} GiB (margin {i['margin']:.0%})",
        "",
        f"{'strategy':<15}{'ckpt':<8}{'prec':<6}" + "".join(f"{p:>12}" for p in PARTS)
        + f"{'total':>10}{'host/node':>11}  fits",
    ]
    for row in plan.rows:
        mark = " *" if row is plan.recommended else ""
        lines.append(f"{_LABELS[row.strategy]:<15}{row.activation_checkpointing:<8}{row.precision:<6}"
                     + "".join(f"{getattr(row, p) / GIB:>12.2f}" for p in PARTS)
                     + f"{row.total / GIB:>10.2f}{row.host / GIB:>11.2f}  {'yes' if row.fits else 'no'}{mark}")
    lines.append("(GiB per GPU at the predicted peak; * = recommended)")
    lines.append("")
    if plan.recommended:
        lines.append(f"recommended: {_describe(plan.recommended)} — {plan.recommended.total / GIB:.2f} GiB per GPU")
    else:
        lines.append("recommended: nothing fits at this micro-batch and segment")
    s = plan.searched_row
    batch_more = "+" if plan.max_micro_batch.capped else ""
    segment_more = "+" if plan.max_segment.capped else ""
    lines += [
        f"under {_describe(s)}: largest micro-batch {int(plan.max_micro_batch.value)}{batch_more} "
        f"(at {i['segment_seconds']} s), longest segment {plan.max_segment.value:g}{segment_more} s "
        f"(at micro-batch {i['micro_batch']}); linear fits checked by tracing: "
        f"{plan.max_micro_batch.fit_error:.1%} / {plan.max_segment.fit_error:.1%} off",
        f"accelerate config: {plan.accelerate_config}",
        f"launch: {plan.launch}",
        "",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    cached = f", {plan.traces_from_cache} of them from the trace cache" if plan.traces_from_cache else ""
    lines.append(f"planned in {plan.seconds:.1f} s (table {plan.table_seconds:.1f} s; "
                 f"{plan.traces} traced steps{cached})")
    return "\n".join(lines)


def format_json(plan: Plan) -> str:
    return json.dumps(plan.as_dict(), indent=2)


def plot(plan: Plan, path: str | Path) -> None:
    """Stacked bars per strategy (one group per checkpointing × precision), the usable memory as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    variants = list(dict.fromkeys((r.activation_checkpointing, r.precision) for r in plan.rows))
    strategies = list(dict.fromkeys(r.strategy for r in plan.rows))
    by_key = {(r.strategy, r.activation_checkpointing, r.precision): r for r in plan.rows}
    colors = {"params": "#4c72b0", "grads": "#dd8452", "optimizer": "#55a868", "activations": "#c44e52",
              "temporary": "#8172b3"}
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(12, 5.5))
    for v, (ac, precision) in enumerate(variants):
        for s, strategy in enumerate(strategies):
            row = by_key[(strategy, ac, precision)]
            x = s + (v - (len(variants) - 1) / 2) * width
            bottom = 0.0
            for part in PARTS:
                height = getattr(row, part) / GIB
                ax.bar(x, height, width * 0.92, bottom=bottom, color=colors[part],
                       edgecolor="black" if row is plan.recommended else "none", linewidth=1.5)
                bottom += height
            ax.text(x, bottom, f"{'ckpt' if ac == 'blocks' else 'full'}\n{precision}", ha="center",
                    va="bottom", fontsize=6.5)
    gpu = plan.inputs["gpu_memory_gib"]
    ax.axhline(gpu, color="black", linewidth=1.2, label=f"GPU memory ({gpu:g} GiB)")
    ax.axhline(plan.inputs["budget_gib"], color="black", linestyle="--", linewidth=1,
               label=f"usable ({plan.inputs['budget_gib']:g} GiB, margin {plan.inputs['margin']:.0%})")
    ax.set_xticks(range(len(strategies)), [_LABELS[s] for s in strategies])
    ax.set_ylabel("predicted peak per GPU (GiB)")
    top = max(r.total for r in plan.rows) / GIB
    ax.set_ylim(0, max(top, gpu) * 1.18)
    i = plan.inputs
    title = (f"{i['model']}: micro-batch {i['micro_batch']} × {i['segment_seconds']} s on "
             f"{i['nodes']}×{i['gpus']} GPU(s)")
    if plan.recommended:
        title += f" — recommended: {_describe(plan.recommended)} (outlined)"
    ax.set_title(title, fontsize=10)
    handles = [Patch(color=colors[part], label=part) for part in PARTS] + ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
