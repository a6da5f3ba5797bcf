"""Memory footprint of one model in fp32, bf16, int8 and nf4, measured, as ratios to fp32.

Each precision loads in a fresh process; the script reports transformers' ``get_memory_footprint`` and,
independently, the bytes of every parameter and buffer storage the loaded model holds. Quantized models keep their
unquantized parts (embeddings, norms, lm_head) in bf16.

    python -m benchmarks.quantization_memory [--hidden 1024 --layers 12]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile


def measure(path: str, precision: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # Quantized models keep their unquantized parts (embeddings, norms, lm_head) in bf16, as on a GPU.
    kwargs = {"dtype": torch.float32 if precision == "fp32" else torch.bfloat16}
    if precision == "bf16":
        pass
    elif precision == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = "cpu"
    elif precision == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    stored = sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()])
    return {"weights_mb": model.get_memory_footprint() / 2**20, "storage_mb": stored / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=args.hidden,
                                  intermediate_size=args.hidden * 11 // 4,
                                  num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                  num_key_value_heads=args.hidden // 128)
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_config(config)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        rows = {}
        for precision in ("fp32", "bf16", "int8", "nf4"):
            out = subprocess.run([sys.executable, "-m", __spec__.name, "--measure", tmp, precision],
                                 capture_output=True, text=True, check=True)
            rows[precision] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"Llama, hidden {args.hidden}, {args.layers} layers, vocab 32000: {n_params / 1e6:.1f}M parameters")
    print("| precision | get_memory_footprint (MiB) | tensor storage (MiB) | ratio to fp32 |")
    print("|---|---|---|---|")
    base = rows["fp32"]["weights_mb"]
    for precision, row in rows.items():
        print(f"| {precision} | {row['weights_mb']:.1f} | {row['storage_mb']:.1f} | {row['weights_mb'] / base:.3f} |")


if __name__ == "__main__":
    main()
