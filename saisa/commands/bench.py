"""`saisa bench`: SAISA vs our LLaVA-1.5 vs transformers' `LlavaForConditionalGeneration`, same dimensions, one process.

Repeats are interleaved (A, B, C, A, B, C, ...) so drift hits every model alike; medians are reported. Peak memory of
a prefill is measured in a fresh subprocess per model (peak RSS on CPU, `max_memory_allocated` on CUDA).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from saisa.compat import CACHE_KWARG, output_cache

MODELS = ("saisa", "llava", "hf-llava")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2752)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--vision-hidden",
        type=int,
        default=64,
        help="CLIP tower width (default tiny: its cost is common to all; 1024 = ViT-L)",
    )
    parser.add_argument("--vision-layers", type=int, default=1, help="CLIP tower depth (24 = ViT-L/14-336)")
    parser.add_argument("--text-tokens", "-t", type=int, default=64)
    parser.add_argument("--visual-tokens", "-v", type=int, default=576, help="must be a square number")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats; medians are reported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step comparison")
    parser.add_argument(
        "--image-cache",
        action="store_true",
        help="instead: SAISA time to first token for a cold image vs the same image again",
    )
    parser.add_argument("--out", default="docs/bench", help="folder for bench.json and bench.png")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: measure one model's peak memory


def bench_configs(args, *, max_positions: int):
    """(image side, vision config, LLM config) of the bench shape: a LLaMA LLM of the given dimensions, a CLIP tower
    giving `args.visual_tokens` patch tokens. Shared with the vLLM bench (`saisa.integrations.vllm.bench`)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    side = int(round(args.visual_tokens**0.5))
    assert side * side == args.visual_tokens, "--visual-tokens must be a square"
    # By default a deliberately small vision tower (its cost is common to all models) that yields v patch tokens;
    # --vision-hidden 1024 --vision-layers 24 gives CLIP ViT-L/14-336's shape.
    vision = CLIPVisionConfig(
        hidden_size=args.vision_hidden,
        intermediate_size=4 * args.vision_hidden,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=max(1, args.vision_hidden // 64),
        image_size=side * 14,
        patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max_positions,
    )
    return side, vision, text


def build(name: str, args) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(model, input_ids, pixel_values) for one image followed by t text tokens."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from saisa import SaisaConfig, SaisaForConditionalGeneration

    side, vision, text = bench_configs(args, max_positions=8192)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    text_ids = torch.randint(3, args.vocab, (1, args.text_tokens))
    pixels = torch.randn(1, 3, side * 14, side * 14)
    if name == "hf-llava":
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=args.vocab - 1,
            image_seq_length=args.visual_tokens,
        )
        model = LlavaForConditionalGeneration(config)
        ids = torch.cat([torch.full((1, args.visual_tokens), args.vocab - 1), text_ids], 1)
    else:
        config = SaisaConfig(text_config=text, vision_config=vision, architecture=name, image_token_id=args.vocab)
        model = SaisaForConditionalGeneration(config)
        ids = torch.cat([torch.tensor([[args.vocab]]), text_ids], 1)
    return model.to(args.device, dtype).eval(), ids.to(args.device), pixels.to(args.device, dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def prefill(model, ids, pixels):
    out = model(input_ids=ids, pixel_values=pixels, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1, keepdim=True), out


def decode(model, ids, pixels, steps: int):
    token, out = prefill(model, ids, pixels)
    cache = output_cache(out)
    mask = torch.ones(1, ids.shape[1], dtype=torch.long, device=ids.device)

    def run():
        nonlocal token, cache, mask
        for _ in range(steps):
            mask = torch.cat([mask, mask[:, :1]], 1)
            step = model(input_ids=token, attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache})
            token = step.logits[:, -1].argmax(-1, keepdim=True)

    return run


def train_step(model, ids, pixels):
    labels = ids.masked_fill(ids == model.config.image_token_id, -100)

    def run():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward()

    return run


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(args) -> float:
    """Peak memory a prefill adds on top of the loaded model (CPU: peak RSS, reset through /proc/self/clear_refs)."""
    model, ids, pixels = build(args.memory_probe, args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = _proc_status_kib("VmRSS") * 1024
    with torch.no_grad():
        prefill(model, ids, pixels)
    if args.device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() - base
    return _proc_status_kib("VmHWM") * 1024 - base


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps({"peak_bytes": memory_probe(args)}))
        return 0
    if args.image_cache:
        return image_cache_bench(args)
    from rich.progress import Progress

    models = {name: build(name, args) for name in MODELS}
    timings = {name: {"prefill_s": [], "decode_s": [], "train_step_s": []} for name in MODELS}
    with torch.no_grad():  # warm-up
        for model, ids, pixels in models.values():
            prefill(model, ids, pixels)
    # Inference first, then training, each phase interleaved: a training step's allocations (activations, gradients)
    # right before a decode made decode times spread by ±10% (45-59 ms a token against 45-48 ms without them).
    phases = ["inference"] + ([] if args.no_train else ["training"])
    # No refresh thread: on a 2-core machine it would take CPU from whichever model is being timed.
    with Progress(auto_refresh=False) as progress:
        task = progress.add_task("interleaved repeats", total=args.repeats * len(MODELS) * len(phases))
        items = list(models.items())
        for phase in phases:
            for repeat in range(args.repeats):
                # every other repeat in reverse order: no model always runs right after the same other model
                for name, (model, ids, pixels) in items if repeat % 2 == 0 else items[::-1]:
                    if phase == "inference":
                        with torch.no_grad():
                            timings[name]["prefill_s"].append(_time(partial(prefill, model, ids, pixels), args.device))
                            run_decode = decode(model, ids, pixels, args.decode_tokens)
                            timings[name]["decode_s"].append(_time(run_decode, args.device))
                    else:
                        model.train()
                        timings[name]["train_step_s"].append(_time(train_step(model, ids, pixels), args.device))
                        model.eval()
                        model.zero_grad(set_to_none=True)  # the next model starts without this one's gradients
                    progress.advance(task)
                    progress.refresh()

    results = {}
    for name in MODELS:
        t = timings[name]
        results[name] = {
            "prefill_s": statistics.median(t["prefill_s"]),
            "decode_tokens_per_s": args.decode_tokens / statistics.median(t["decode_s"]),
            "train_step_s": statistics.median(t["train_step_s"]) if t["train_step_s"] else None,
            "peak_prefill_bytes": _probe_memory(name, args),
            "repeats_s": t,  # every timed repeat, in order: the spread behind each median
        }
    ratios = {
        "saisa_prefill_vs_hf_llava": results["saisa"]["prefill_s"] / results["hf-llava"]["prefill_s"],
        "saisa_prefill_vs_llava": results["saisa"]["prefill_s"] / results["llava"]["prefill_s"],
        "saisa_decode_vs_llava": results["saisa"]["decode_tokens_per_s"] / results["llava"]["decode_tokens_per_s"],
        "saisa_decode_vs_hf_llava": results["saisa"]["decode_tokens_per_s"]
        / results["hf-llava"]["decode_tokens_per_s"],
        "our_llava_prefill_vs_hf_llava": results["llava"]["prefill_s"] / results["hf-llava"]["prefill_s"],
    }
    if not args.no_train:
        ratios["saisa_train_vs_llava"] = results["saisa"]["train_step_s"] / results["llava"]["train_step_s"]
        ratios["saisa_train_vs_hf_llava"] = results["saisa"]["train_step_s"] / results["hf-llava"]["train_step_s"]
    _print(results, ratios, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("memory_probe",)}
    (out / "bench.json").write_text(
        json.dumps({"config": config, "results": results, "ratios": ratios, "command": " ".join(sys.argv)}, indent=2)
    )
    _plot(results, out / "bench.png", args)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return 0


def image_cache_bench(args) -> int:
    """TTFT of a prompt with a new image (cold: encoder + L projectors + L visual K/V projections) against the same
    image again in a different prompt (warm: served from the image KV cache, only rotated at its new position)."""
    from saisa.modeling.image_kv_cache import ImageKVCache

    model, ids, pixels = build("saisa", args)
    model.image_kv_cache = ImageKVCache(4 << 30)
    # Another prompt of the same length with the image moved 8 tokens later: the cached K/V are rotated anew.
    other_prompt = torch.cat([ids[:, 1:9], ids[:, :1], ids[:, 9:]], 1)
    cold, warm = [], []
    with torch.no_grad():
        prefill(model, ids, pixels)  # warm-up of the kernels, not of the cache
        for repeat in range(args.repeats):
            image = pixels + (repeat + 1) * 1e-3  # a new image every repeat
            cold.append(_time(partial(prefill, model, ids, image), args.device))
            warm.append(_time(partial(prefill, model, other_prompt, image), args.device))
    result = {"cold_ttft_s": statistics.median(cold), "repeat_ttft_s": statistics.median(warm)}
    result["repeat_over_cold"] = result["repeat_ttft_s"] / result["cold_ttft_s"]
    result["cache"] = model.image_kv_cache.stats()
    print(
        f"h={args.hidden} L={args.layers} v={args.visual_tokens} t={args.text_tokens} vision tower "
        f"{args.vision_layers}x{args.vision_hidden} {args.device} {args.dtype} threads={args.threads} "
        f"(medians of {args.repeats})"
    )
    print(f"cold image TTFT   {1000 * result['cold_ttft_s']:8.1f} ms")
    print(f"repeat image TTFT {1000 * result['repeat_ttft_s']:8.1f} ms   (another prompt, image 8 positions later)")
    print(f"repeat / cold     {result['repeat_over_cold']:8.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"image_cache_vision{args.vision_layers}x{args.vision_hidden}.json"
    (out / name).write_text(
        json.dumps({"config": vars(args), "result": result, "command": " ".join(sys.argv)}, indent=2)
    )
    print(f"wrote {out / name}")
    return 0


def _probe_memory(name: str, args) -> float | None:
    argv = [sys.executable, "-m", "saisa.cli", "bench", "--memory-probe", name]
    for key in (
        "hidden",
        "ffn",
        "layers",
        "heads",
        "vocab",
        "text_tokens",
        "visual_tokens",
        "threads",
        "device",
        "dtype",
        "vision_hidden",
        "vision_layers",
    ):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.kv_heads:
        argv += ["--kv-heads", str(args.kv_heads)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"memory probe for {name} failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def _print(results, ratios, args) -> None:
    print(
        f"\nh={args.hidden} m={args.ffn} L={args.layers} heads={args.heads} v={args.visual_tokens} "
        f"t={args.text_tokens} {args.device} {args.dtype} threads={args.threads} (medians of {args.repeats})"
    )
    print(f"{'model':<9} {'TTFT ms':>9} {'decode tok/s':>13} {'train step ms':>14} {'peak prefill MiB':>17}")
    for name, r in results.items():
        train = f"{1000 * r['train_step_s']:14.1f}" if r["train_step_s"] else f"{'-':>14}"
        mem = f"{r['peak_prefill_bytes'] / 2**20:17.1f}" if r["peak_prefill_bytes"] is not None else f"{'-':>17}"
        print(f"{name:<9} {1000 * r['prefill_s']:9.1f} {r['decode_tokens_per_s']:13.1f} {train} {mem}")
    for key, value in ratios.items():
        print(f"{key:<32} {value:.3f}")


def _plot(results, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        ("prefill_s", "TTFT (s)"),
        ("decode_tokens_per_s", "decode tokens/s"),
        ("train_step_s", "train step (s)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, (key, label) in zip(axes, metrics, strict=True):
        names = [n for n in MODELS if results[n][key] is not None]
        ax.bar(names, [results[n][key] for n in names], color=["tab:green", "tab:blue", "tab:gray"][: len(names)])
        ax.set_title(label)
    fig.suptitle(f"h={args.hidden} L={args.layers} v={args.visual_tokens} t={args.text_tokens} {args.device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
