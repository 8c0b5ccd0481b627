"""Memory for the model states (weights, gradients, Adam) of the models `create_model` builds, under ZeRO 0-3 and
ZeRO-Offload: the ZeRO paper's accounting next to DeepSpeed's own estimators. Prints Markdown tables.

    python benchmarks/memory_estimate.py --tokenizer ../shared/data/roberta-base
    python benchmarks/memory_estimate.py --tokenizer ../shared/data/roberta-base --gpus 8 --gpu_gib 80

The models are built on PyTorch's "meta" device: parameters have shapes but no storage, so a 1.3B-parameter model
is counted in a second on any machine. Only model states are counted: activations, communication buffers, the
CUDA context and fragmentation come on top (a few GiB on a GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_bert  # noqa: E402
from pretraining.corpus import load_tokenizer  # noqa: E402
from pretraining.flag_rules import flag_defaults  # noqa: E402

GIB = 2**30
DEFAULTS = flag_defaults(train_bert.train)
# (name, num_layers, num_heads, h_dim, ff_dim)
MODELS = [
    ("train_bert.py default", DEFAULTS["num_layers"], DEFAULTS["num_heads"], DEFAULTS["h_dim"], DEFAULTS["ff_dim"]),
    ("BERT-base", 12, 12, 768, 3072),
    ("BERT-large", 24, 16, 1024, 4096),
    ("1.3B (24 x 2048)", 24, 16, 2048, 8192),
    ("2.7B (32 x 2560)", 32, 32, 2560, 10240),
]


def meta_model(
    tokenizer, num_layers: int, num_heads: int, h_dim: int, ff_dim: int, max_seq_length: int
) -> torch.nn.Module:
    """The model train_bert.create_model builds, with shapes only (no memory, no initialisation cost); learned
    positions, as BERT and RoBERTa were published."""
    with torch.device("meta"):
        return train_bert.create_model(
            num_layers, num_heads, ff_dim, h_dim, 0.1, tokenizer, max_seq_length, positions="learned"
        )


def largest_layer_params(model: torch.nn.Module) -> int:
    """Parameters of the biggest single module: ZeRO-3 gathers one module's full weights at a time."""
    return max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())


def paper_bytes(params: int, stage: int, gpus: int) -> float:
    """Model-state bytes per GPU for mixed-precision Adam (ZeRO paper, section 3): 2 bytes of fp16 weights, 2 of
    fp16 gradients, 12 of optimizer state (fp32 master weights, momentum, variance) per parameter = 16.
    ZeRO-1 partitions the 12, ZeRO-2 also the gradients' 2, ZeRO-3 also the weights' 2."""
    per_param = {0: 16, 1: 4 + 12 / gpus, 2: 2 + 14 / gpus, 3: 16 / gpus}[stage]
    return per_param * params


def fits(gib: float, limit: float) -> str:
    return f"{gib:.2f}" + (" ✗" if gib > limit else "")


def main(tokenizer: str = "roberta-base", gpus: int = 1, gpu_gib: float = 16.0, max_seq_length: int = 128) -> None:
    """Print the tables for `gpus` GPUs (one node); ✗ marks a figure above `gpu_gib` GiB of GPU memory."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    loaded = load_tokenizer(tokenizer)
    rows = []
    for name, layers, heads, h_dim, ff_dim in MODELS:
        model = meta_model(loaded, layers, heads, h_dim, ff_dim, max_seq_length)
        rows.append((name, train_bert.count_parameters(model), largest_layer_params(model)))

    print(
        f"Model states per GPU, ZeRO paper's formula (mixed-precision Adam, 16 bytes/parameter), {gpus} GPU(s), GiB:\n"
    )
    print("| model | parameters | ZeRO-0: 16Ψ | ZeRO-1: 4Ψ+12Ψ/N | ZeRO-2: 2Ψ+14Ψ/N | ZeRO-3: 16Ψ/N |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, params, _ in rows:
        cells = " | ".join(fits(paper_bytes(params, stage, gpus) / GIB, gpu_gib) for stage in range(4))
        print(f"| {name} | {params / 1e6:,.1f}M | {cells} |")

    print(
        f"\nDeepSpeed's estimators (estimate_zero2/zero3_model_states_mem_needs), {gpus} GPU(s), "
        "GiB per GPU / GiB of CPU RAM for the node:\n"
    )
    print(
        "| model | ZeRO-2 | ZeRO-2 + offload optimizer | ZeRO-3 | ZeRO-3 + offload optimizer "
        "| ZeRO-3 + offload optimizer and parameters |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, params, largest in rows:
        cells = []
        for offload in (False, True):
            cpu, gpu = estimate_zero2_model_states_mem_needs(params, gpus, 1, cpu_offload=offload)
            cells.append(f"{fits(gpu / GIB, gpu_gib)} / {cpu / GIB:.1f}")
        for offload, offload_params in ((False, False), (True, False), (True, True)):
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                params, largest, gpus, 1, cpu_offload=offload, cpu_offload_params=offload_params
            )
            cells.append(f"{fits(gpu / GIB, gpu_gib)} / {cpu / GIB:.1f}")
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
