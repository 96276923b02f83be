"""What FP8 weights cost a trained model, on the CPU: perplexity and agreement with the
unquantized logits, teacher-forced over a text, for FP8 layers, FP8 layers and LM head,
and the LM head alone (docs/benchmarks.md, EngineConfig.fp8_lm_head).

Each chosen weight is quantized to e4m3 with per-row scales and dequantized, as the CUDA
runtime stores it (engine/runtime/cuda/fp8.py); the products run in float32, so only the
weights' rounding is measured. Default: the embedded SmolLM2-135M-Instruct and the user
guide.

    PYTHONPATH=. python bench/fp8_accuracy.py [--model FOLDER] [--text FILE] [--tokens 2048]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from engine.runtime.cuda.fp8 import quantize_rows

GUIDE = Path(__file__).resolve().parents[2] / "shared" / "seed" / "generate-guide.txt"


def default_model() -> Path:
    from engine.default_model import find_default_gguf
    from engine.gguf_convert import cached_conversion

    return cached_conversion(find_default_gguf())


def load(folder: Path, layers: bool, head: bool) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    fp8 = lambda w: quantize_rows(w.float()).dequantize(torch.float32)  # noqa: E731
    if layers:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                module.weight.copy_(fp8(module.weight))
    if head:  # its own copy: a tied embedding's lookup keeps the unquantized rows
        model.lm_head.weight = torch.nn.Parameter(fp8(model.lm_head.weight.detach().clone()))
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None, help="a transformers checkpoint folder")
    ap.add_argument("--text", type=Path, default=GUIDE)
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    folder = args.model or default_model()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(args.text.read_text(), return_tensors="pt").input_ids[:, : args.tokens]
    print(f"{folder.name}: {ids.shape[1]} tokens of {args.text.name}, teacher-forced")
    ref = load(folder, False, False)(ids).logits[0]
    print("| weights | perplexity | logits vs unquantized (relative) | top-1 vs unquantized | KL(unquantized, x) |")
    print("|---|---|---|---|---|")
    for label, layers, head in (("as loaded", False, False), ("FP8 layers", True, False),
                                ("FP8 layers and LM head", True, True), ("FP8 LM head only", False, True)):
        logits = ref if not (layers or head) else load(folder, layers, head)(ids).logits[0]
        ppl = F.cross_entropy(logits[:-1], ids[0, 1:]).exp().item()
        rel = ((logits - ref).norm() / ref.norm()).item()
        top1 = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        kl = F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()
        print(f"| {label} | {ppl:.3f} | {rel:.2e} | {top1:.3f} | {kl:.4f} |")


if __name__ == "__main__":
    main()
