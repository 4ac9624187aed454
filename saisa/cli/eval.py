"""`saisa eval MODEL --questions Q.jsonl --image-folder DIR`: batched evaluation, predictions + metrics JSON."""

from __future__ import annotations

import argparse
import json

from saisa.checkpoints.loading import add_device_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a saved model folder (model + processor)")
    parser.add_argument("--questions", required=True, help="LLaVA-style question JSONL")
    parser.add_argument("--image-folder", help="folder the questions' image paths are relative to")
    parser.add_argument("--out", default=None, help="folder for predictions.jsonl and metrics.json")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--blind", action="store_true", help="ask without the images (a language-prior baseline)")
    parser.add_argument(
        "--allow-external-images",
        action="store_true",
        help="accept image paths outside --image-folder (absolute, or leading out with '..'); refused by default",
    )
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from saisa.checkpoints.loading import load_pretrained
    from saisa.evaluation import evaluate, read_questions

    # the question file and image folder are checked before the model loads: a bad file fails in seconds, not after
    if args.image_folder and not Path(args.image_folder).is_dir():
        raise FileNotFoundError(f"image folder not found: {args.image_folder}")
    usable, skipped = read_questions(args.questions, allow_external_images=args.allow_external_images)
    if not usable:
        reasons = "; ".join(f"{item.where}: {item.reason}" for item in skipped[:3])
        raise ValueError(f"no question in {args.questions} can be asked ({len(skipped)} row(s) skipped: {reasons})")
    model, processor = load_pretrained(args.model, device=args.device, dtype=args.dtype)
    out = args.out or str(Path(args.model) / "eval")
    metrics = evaluate(
        model,
        processor,
        args.questions,
        args.image_folder,
        out_dir=out,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        blind=args.blind,
        allow_external_images=args.allow_external_images,
    )
    print(json.dumps(metrics, indent=2))
    tag = "blind_" if args.blind else ""
    if metrics["skipped"]:
        print(
            f"warning: {metrics['skipped']} row(s) skipped, {metrics['unreadable']} of them not valid UTF-8 or JSON "
            f"(file:line and reason in {out}/{tag}skipped.jsonl)"
        )
    if metrics["missing_images"] or metrics["failed"]:
        print(
            f"warning: {metrics['missing_images']} question(s) had a missing or unreadable image and "
            f"{metrics['failed']} failed in generation; see their errors in {out}/{tag}predictions.jsonl"
        )
    print(f"wrote {out}")
    return 0
