"""Prefill time of SAISA vs LLaVA-1.5 of the same shape, both served by vLLM (docs/serving.md, "vLLM").

    .venv-vllm/bin/python -m saisa.integrations.vllm.bench --out docs/bench/vllm_prefill.json

The two checkpoints share the LLM and vision weights (`saisa bench`'s shape: a Llama of h 1024 x 8 layers, one image
of v = 576 tokens from a deliberately small CLIP tower whose cost is common to both, t = 64 text tokens). Each runs in
its own process with an in-process engine; the parent alternates requests between them (interleaved repeats, only
one computing at a time) and reports medians. A request is one prompt with a fresh image (no cache can answer it)
and one generated token: time to first token, vision encoder and preprocessing included, as a client sees it.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def build_checkpoints(args, root: Path) -> dict[str, Path]:
    """Random-weight saisa and llava folders with the same LLM and vision tower, and a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from saisa import SaisaConfig, SaisaForConditionalGeneration
    from saisa.bench.compare import bench_configs
    from saisa.processing import SaisaProcessor

    _, vision, text = bench_configs(args, max_positions=4096)
    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 1000)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    torch.manual_seed(0)
    folders, shared = {}, None
    for name in ("saisa", "llava"):
        config = SaisaConfig(text_config=text, vision_config=vision, architecture=name, image_token_id=len(words))
        model = SaisaForConditionalGeneration(config)
        if shared is None:
            kept = ("model.language_model.", "lm_head.", "model.vision_")  # the LLM and the vision tower
            shared = {k: v for k, v in model.state_dict().items() if k.startswith(kept)}
        else:
            model.load_state_dict(shared, strict=False)
        folders[name] = root / name
        model.save_pretrained(folders[name])
        processor = SaisaProcessor(tokenizer, model.vision_tower.preprocessing)
        assert processor.image_token_id == config.image_token_id
        processor.save_pretrained(folders[name])
    return folders


def serve(folder: str, text_tokens: int, connection) -> None:
    """Child process: one engine; answers each message (a seed) with the seconds one request took."""
    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    llm = LLM(folder, dtype="float32", enforce_eager=True, max_model_len=2048, max_num_batched_tokens=2048,
              enable_prefix_caching=False, seed=0)  # fmt: skip
    side = llm.llm_engine.model_config.hf_config.vision_config.image_size
    prompt = "<image> " + " ".join(f"w{3 + i}" for i in range(text_tokens))
    once = SamplingParams(max_tokens=1, temperature=0)
    while (seed := connection.recv()) is not None:
        image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8))
        start = time.perf_counter()
        output = llm.generate({"prompt": prompt, "multi_modal_data": {"image": [image]}}, once, use_tqdm=False)[0]
        connection.send((time.perf_counter() - start, len(output.prompt_token_ids)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2752)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, help="default: --heads")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--vision-hidden", type=int, default=64)
    parser.add_argument("--vision-layers", type=int, default=1)
    parser.add_argument("--visual-tokens", "-v", type=int, default=576)
    parser.add_argument("--text-tokens", "-t", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats after 2 warm-up rounds")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each engine")
    parser.add_argument("--out", default="docs/bench/vllm_prefill.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by torch in each engine process at start
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

    import vllm

    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as root:
        folders = build_checkpoints(args, Path(root))
        workers = {}
        for name, folder in folders.items():
            parent, child = context.Pipe()
            process = context.Process(target=serve, args=(str(folder), args.text_tokens, child))
            process.start()
            workers[name] = (process, parent)
        times = {name: [] for name in workers}
        prompt_tokens, load_before = {}, os.getloadavg()[0]
        try:
            for round_ in range(args.repeats + 2):
                for name, (_, connection) in workers.items():
                    connection.send(round_)
                    seconds, prompt_tokens[name] = connection.recv()
                    if round_ >= 2:  # the first two rounds warm up each engine
                        times[name].append(seconds)
        finally:
            for process, connection in workers.values():
                connection.send(None)
                process.join(timeout=120)

    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "what": "time to first token (one request: preprocessing, vision encoder, prefill, one sampled token) on "
        "vLLM, medians of interleaved repeats",
        "shape": {k: getattr(args, k) for k in ("hidden", "ffn", "layers", "heads", "vocab", "visual_tokens")}
        | {"text_tokens": args.text_tokens, "vision_tower": f"CLIP {args.vision_layers}x{args.vision_hidden}"},
        "prompt_tokens": prompt_tokens,
        "engine": f"vllm {vllm.__version__}, in-process, eager, float32, prefix caching off",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads per engine",
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},  # other work on the machine
        "repeats": args.repeats,
        "seconds": times,
        "median_ms": {name: round(1000 * value, 1) for name, value in medians.items()},
        "saisa_over_llava": round(medians["saisa"] / medians["llava"], 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    logger.info(json.dumps({k: result[k] for k in ("median_ms", "saisa_over_llava", "prompt_tokens")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
