"""FLOPs and model FLOPs utilization (MFU) of a benchmarked training step (``bench/objectives.py``).

FLOPs are what torch's ``FlopCounterMode`` counts over one step of a side: matrix products,
convolutions and attention as that side runs them, the work MFU conventionally counts
(elementwise work is left out). Work an implementation skips is therefore not credited to it.
"""

from __future__ import annotations

import statistics

import torch
from peers import Side

#: dense bf16 tensor-core peak, TFLOPS, by a substring of ``torch.cuda.get_device_name()`` (first
#: match wins): the vendors' data-sheet figures without sparsity
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("A10G", 70.0), ("L4", 121.0)]


def step_flops(side: Side, step: int, autocast) -> tuple[float, int]:
    """(loss, FLOPs) of training step ``step``: forward, backward and optimizer."""
    from torch.utils.flop_counter import FlopCounterMode

    _count_cpu_attention()
    with FlopCounterMode(display=False) as counter:
        loss = side.step(step, autocast)
    return float(loss), counter.get_total_flops()


_CPU_ATTENTION_COUNTED = False


def _count_cpu_attention() -> None:
    """``FlopCounterMode`` knows the GPU attention kernels only; the CPU flash kernel (SDPA's
    default here) gets the same formulas."""
    global _CPU_ATTENTION_COUNTED
    if _CPU_ATTENTION_COUNTED:
        return
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    _CPU_ATTENTION_COUNTED = True
    if aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:  # a newer torch counts it itself
        return

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def peak_tflops(args) -> float | None:
    """The peak the MFU column divides by: ``--peak-tflops``, else the GPU's dense bf16 figure."""
    if args.peak_tflops:
        return args.peak_tflops
    if args.device == "cuda" and args.dtype == "bf16":
        name = torch.cuda.get_device_name()
        return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)
    return None


def utilization(results: list[dict], args) -> list[str]:
    """FLOPs per sample as each side runs them, the rate they reach, and MFU against the peak."""
    peak = peak_tflops(args)
    rows = [f"| objective | GFLOP per sample ours / peer | TFLOPS ours / peer | MFU ours / peer (peak {peak or '?'} TFLOPS) |",
            "|---|---|---|---|"]
    for r in results:
        fps = r["flops_per_sample"]
        rate = {k: fps[k] * statistics.median(v) / 1e12 for k, v in r["rates"].items()}
        mfu = f"{100 * rate['ours'] / peak:.1f} % / {100 * rate['peer'] / peak:.1f} %" if peak else "— (no peak known: --peak-tflops)"
        rows.append(f"| {r['name']} | {fps['ours'] / 1e9:.3g} / {fps['peer'] / 1e9:.3g} | "
                    f"{rate['ours']:.3g} / {rate['peer']:.3g} | {mfu} |")
    return rows
