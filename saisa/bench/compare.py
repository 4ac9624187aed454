"""SAISA vs our LLaVA-1.5 vs transformers' `LlavaForConditionalGeneration`, same dimensions, one process: time to first
token, decode speed, a training step, and peak prefill memory; and SAISA's time to first token for a cold image vs
the same image again (the image KV cache).

Repeats are interleaved (`saisa.bench.timing`); medians are reported. Peak memory of a prefill is measured in a fresh
subprocess per model (peak RSS on CPU, `max_memory_allocated` on CUDA).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from saisa.bench.timing import interleaved, medians, timed
from saisa.compat import CACHE_KWARG, output_cache
from saisa.processing.templates import IGNORE_INDEX

logger = logging.getLogger(__name__)

MODELS = ("saisa", "llava", "hf-llava")


@dataclass(frozen=True)
class BenchSettings:
    """The shape compared and how it is timed (the `saisa bench` flags, recorded under "config" in bench.json)."""

    hidden: int = 1024
    ffn: int = 2752
    layers: int = 8
    heads: int = 16
    kv_heads: int | None = None  # None: as many as --heads
    vocab: int = 32000
    vision_hidden: int = 64  # a tiny tower by default: its cost is common to every model
    vision_layers: int = 1
    text_tokens: int = 64
    visual_tokens: int = 576  # a square: the tower's patch grid
    decode_tokens: int = 32
    repeats: int = 9
    threads: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    no_train: bool = False
    image_cache: bool = False
    out: str = "docs/bench"


def bench_configs(shape, *, max_positions: int):
    """(image side, vision config, LLM config) of the bench shape: a LLaMA LLM of the given dimensions, a CLIP tower
    giving `shape.visual_tokens` patch tokens. `shape` is any object with `BenchSettings`' shape fields (the vLLM
    bench passes its own flags)."""
    from transformers import CLIPVisionConfig, LlamaConfig

    side = int(round(shape.visual_tokens**0.5))
    if side * side != shape.visual_tokens:
        raise ValueError(f"--visual-tokens must be a square number, not {shape.visual_tokens}")
    # vision_hidden 1024 x vision_layers 24 gives CLIP ViT-L/14-336's shape
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=4 * shape.vision_hidden,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=max(1, shape.vision_hidden // 64),
        image_size=side * 14,
        patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads or shape.heads,
        vocab_size=shape.vocab,
        max_position_embeddings=max_positions,
    )
    return side, vision, text


def build(name: str, settings: BenchSettings) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(model, input_ids, pixel_values) for one image followed by t text tokens."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from saisa import SaisaConfig, SaisaForConditionalGeneration

    side, vision, text = bench_configs(settings, max_positions=8192)
    dtype = getattr(torch, settings.dtype)
    torch.manual_seed(0)
    text_ids = torch.randint(3, settings.vocab, (1, settings.text_tokens))
    pixels = torch.randn(1, 3, side * 14, side * 14)
    if name == "hf-llava":
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=settings.vocab - 1,
            image_seq_length=settings.visual_tokens,
        )
        model = LlavaForConditionalGeneration(config)
        ids = torch.cat([torch.full((1, settings.visual_tokens), settings.vocab - 1), text_ids], 1)
    else:
        config = SaisaConfig(text_config=text, vision_config=vision, architecture=name, image_token_id=settings.vocab)
        model = SaisaForConditionalGeneration(config)
        ids = torch.cat([torch.tensor([[settings.vocab]]), text_ids], 1)
    device = settings.device
    return model.to(device, dtype).eval(), ids.to(device), pixels.to(device, dtype)


def prefill(model, ids, pixels):
    out = model(input_ids=ids, pixel_values=pixels, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1, keepdim=True), out


def decode(model, ids, pixels, steps: int):
    """A prefill (untimed), then the call that greedily decodes `steps` tokens from its cache."""
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
    labels = ids.masked_fill(ids == model.config.image_token_id, IGNORE_INDEX)

    def run():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward()

    return run


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(name: str, settings: BenchSettings) -> float:
    """Peak memory a prefill adds on top of the loaded model (CPU: peak RSS, reset through /proc/self/clear_refs)."""
    torch.set_num_threads(settings.threads)
    model, ids, pixels = build(name, settings)
    on_cuda = settings.device.startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = _proc_status_kib("VmRSS") * 1024
    with torch.no_grad():
        prefill(model, ids, pixels)
    if on_cuda:
        return torch.cuda.max_memory_allocated() - base
    return _proc_status_kib("VmHWM") * 1024 - base


def run_bench(settings: BenchSettings) -> dict:
    """The comparison (or, with `settings.image_cache`, the image-cache one); writes its JSON (and bench.png) under
    `settings.out` and returns what it wrote."""
    torch.set_num_threads(settings.threads)
    if settings.image_cache:
        return image_cache_bench(settings)
    models = {name: build(name, settings) for name in MODELS}
    with torch.no_grad():  # warm-up
        for model, ids, pixels in models.values():
            prefill(model, ids, pixels)
    # Inference first, then training, each interleaved on its own: a training step's allocations (activations,
    # gradients) right before a decode spread the decode times.
    inference = {
        name: {
            "prefill_s": partial(partial, prefill, *inputs),  # nothing to set up: the prefill itself is timed
            "decode_s": partial(decode, *inputs, settings.decode_tokens),
        }
        for name, inputs in models.items()
    }
    with torch.no_grad():
        timings = interleaved(inference, settings.repeats, device=settings.device, description="inference")
    for name in MODELS:
        timings[name]["train_step_s"] = []
    if not settings.no_train:
        training = {name: {"train_step_s": partial(_training, *inputs)} for name, inputs in models.items()}
        trained = interleaved(
            training, settings.repeats, device=settings.device, after=partial(_untrain, models), description="training"
        )
        for name in MODELS:
            timings[name].update(trained[name])

    results = {}
    for name in MODELS:
        median = medians({key: values for key, values in timings[name].items() if values})
        results[name] = {
            "prefill_s": median["prefill_s"],
            "decode_tokens_per_s": settings.decode_tokens / median["decode_s"],
            "train_step_s": median.get("train_step_s"),
            "peak_prefill_bytes": _probe_memory(name, settings),
            "repeats_s": timings[name],  # every timed repeat, in order: the spread behind each median
        }
    ratios = {
        "saisa_prefill_vs_hf_llava": results["saisa"]["prefill_s"] / results["hf-llava"]["prefill_s"],
        "saisa_prefill_vs_llava": results["saisa"]["prefill_s"] / results["llava"]["prefill_s"],
        "saisa_decode_vs_llava": results["saisa"]["decode_tokens_per_s"] / results["llava"]["decode_tokens_per_s"],
        "saisa_decode_vs_hf_llava": results["saisa"]["decode_tokens_per_s"]
        / results["hf-llava"]["decode_tokens_per_s"],
        "our_llava_prefill_vs_hf_llava": results["llava"]["prefill_s"] / results["hf-llava"]["prefill_s"],
    }
    if not settings.no_train:
        ratios["saisa_train_vs_llava"] = results["saisa"]["train_step_s"] / results["llava"]["train_step_s"]
        ratios["saisa_train_vs_hf_llava"] = results["saisa"]["train_step_s"] / results["hf-llava"]["train_step_s"]
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"config": _config(settings), "results": results, "ratios": ratios, "command": " ".join(sys.argv)}
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    _plot(results, out / "bench.png", settings)
    logger.info("wrote %s and %s", out / "bench.json", out / "bench.png")
    return report


def _training(model, ids, pixels):
    """Set-up of a timed training step: train mode, then the step."""
    model.train()
    return train_step(model, ids, pixels)


def _untrain(models: dict, name: str) -> None:
    """Back to eval, without the gradients: the next model starts without this one's."""
    model = models[name][0]
    model.eval()
    model.zero_grad(set_to_none=True)


def _config(settings: BenchSettings) -> dict:
    """The command's flags as `saisa bench` parsed them (the verb included)."""
    return {"verb": "bench", **asdict(settings)}


def image_cache_bench(settings: BenchSettings) -> dict:
    """TTFT of a prompt with a new image (cold: encoder + L projectors + L visual K/V projections) against the same
    image again in a different prompt (warm: served from the image KV cache, only rotated at its new position)."""
    from saisa.model.image_kv_cache import ImageKVCache

    model, ids, pixels = build("saisa", settings)
    model.image_kv_cache = ImageKVCache(4 << 30)
    # Another prompt of the same length with the image moved 8 tokens later: the cached K/V are rotated anew.
    other_prompt = torch.cat([ids[:, 1:9], ids[:, :1], ids[:, 9:]], 1)
    cold, warm = [], []
    with torch.no_grad():
        prefill(model, ids, pixels)  # warm-up of the kernels, not of the cache
        for repeat in range(settings.repeats):
            image = pixels + (repeat + 1) * 1e-3  # a new image every repeat
            cold.append(timed(partial(prefill, model, ids, image), settings.device))
            warm.append(timed(partial(prefill, model, other_prompt, image), settings.device))
    result = medians({"cold_ttft_s": cold, "repeat_ttft_s": warm})
    result["repeat_over_cold"] = result["repeat_ttft_s"] / result["cold_ttft_s"]
    result["cache"] = model.image_kv_cache.stats()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"image_cache_vision{settings.vision_layers}x{settings.vision_hidden}.json"
    report = {"config": _config(settings), "result": result, "command": " ".join(sys.argv)}
    path.write_text(json.dumps(report, indent=2))
    logger.info("wrote %s", path)
    return report


def _probe_memory(name: str, settings: BenchSettings) -> float | None:
    """`memory_probe` in a fresh process (`saisa bench --memory-probe`): a peak is only clean in a process that has
    not already allocated the other models."""
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
        argv += [f"--{key.replace('_', '-')}", str(getattr(settings, key))]
    if settings.kv_heads:
        argv += ["--kv-heads", str(settings.kv_heads)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        logger.warning("memory probe for %s failed: %s", name, done.stderr.strip()[-300:])
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def summary(report: dict) -> str:
    """The table a person reads, from what `run_bench` returned."""
    s = report["config"]
    if "result" in report:  # the image-cache comparison
        result = report["result"]
        return "\n".join(
            [
                f"h={s['hidden']} L={s['layers']} v={s['visual_tokens']} t={s['text_tokens']} vision tower "
                f"{s['vision_layers']}x{s['vision_hidden']} {s['device']} {s['dtype']} threads={s['threads']} "
                f"(medians of {s['repeats']})",
                f"cold image TTFT   {1000 * result['cold_ttft_s']:8.1f} ms",
                f"repeat image TTFT {1000 * result['repeat_ttft_s']:8.1f} ms   (another prompt, image 8 positions "
                "later)",
                f"repeat / cold     {result['repeat_over_cold']:8.3f}",
            ]
        )
    lines = [
        f"\nh={s['hidden']} m={s['ffn']} L={s['layers']} heads={s['heads']} v={s['visual_tokens']} "
        f"t={s['text_tokens']} {s['device']} {s['dtype']} threads={s['threads']} (medians of {s['repeats']})",
        f"{'model':<9} {'TTFT ms':>9} {'decode tok/s':>13} {'train step ms':>14} {'peak prefill MiB':>17}",
    ]
    for name, r in report["results"].items():
        train = f"{1000 * r['train_step_s']:14.1f}" if r["train_step_s"] else f"{'-':>14}"
        mem = f"{r['peak_prefill_bytes'] / 2**20:17.1f}" if r["peak_prefill_bytes"] is not None else f"{'-':>17}"
        lines.append(f"{name:<9} {1000 * r['prefill_s']:9.1f} {r['decode_tokens_per_s']:13.1f} {train} {mem}")
    lines += [f"{key:<32} {value:.3f}" for key, value in report["ratios"].items()]
    return "\n".join(lines)


def _plot(results, path: Path, settings: BenchSettings) -> None:
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
    s = settings
    fig.suptitle(f"h={s.hidden} L={s.layers} v={s.visual_tokens} t={s.text_tokens} {s.device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
