"""Evaluate a VATT checkpoint: ``python -m vatt_fast.eval --checkpoint PATH --data DIR --task TASK``.

Tasks:

- ``retrieval``: zero-shot text-to-video, video-to-text and video-to-audio retrieval
  on a split (R@1/5/10 and median rank, beside chance), as in the trainer's final
  evaluation (see :mod:`vatt_fast.metrics` for the protocol).
- ``linear-probe``: a multinomial logistic regression (L-BFGS, in torch) on the frozen
  pooled video features and, separately, the pooled audio features of ``--train-split``,
  scored on ``--split`` against the manifest's ``label`` field (accuracy).

``--checkpoint`` takes a checkpoint folder (``<run>/checkpoints/step-*``), a run folder
(its latest checkpoint) or a ``model.safetensors`` file: the model config travels in
the safetensors metadata, so nothing but tensors and JSON is read (no unpickling).
Works on any dataset in the vatt_fast layout whose ``vocab.txt`` is the one the model
was trained with (text ids must mean the same words).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from vatt_fast.checkpoint import WEIGHTS_NAME, load_weights, read_meta, read_weights_config, resolve_checkpoint
from vatt_fast.metrics import format_retrieval_table, linear_probe
from vatt_fast.training.loop import evaluate
from vatt_fast.training.params import ATTENTION, DEVICES, KERNELS, LOADERS, PRECISIONS
from vatt_fast.training.precision import autocast
from vatt_fast.training.setup import check_data

__all__ = ["build_parser", "main", "cli", "load_model", "extract_features"]

log = logging.getLogger("vatt_fast.eval")
TASKS = ("retrieval", "linear-probe")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vatt_fast.eval",
        description="Evaluate a VATT checkpoint: zero-shot retrieval or a linear probe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--checkpoint", required=True, help="checkpoint folder, run folder (latest checkpoint) or model.safetensors")
    a("--data", default=None, help="dataset folder (default: the one the checkpoint was trained on)")
    a("--task", default="retrieval", choices=TASKS, help="what to measure")
    a("--split", default="val", help="split to evaluate on (the probe's test split)")
    a("--train-split", default="train", help="split the linear probe is fitted on")
    a("--batch-size", type=int, default=32, help="clips per batch")
    a("--precision", default="auto", choices=PRECISIONS, help="auto: bf16 on CUDA, fp32 on CPU")
    a("--device", default="auto", choices=DEVICES, help="where to run")
    a("--kernels", default="auto", choices=KERNELS, help="fused-kernel implementation")
    a("--attention", default="auto", choices=ATTENTION, help="attention backend")
    a("--loader", default="auto", choices=LOADERS, help="data loader backend")
    a("--workers", type=int, default=2, help="loader worker processes")
    a("--probe-weight-decay", type=float, default=1e-4, help="L2 strength of the linear probe")
    a("--out", default=None, help="also write the results as JSON to this file")
    return p


def load_model(checkpoint: str, device: torch.device) -> torch.nn.Module:
    """Rebuild the model of a checkpoint (config from the safetensors metadata) and load its weights.

    Args:
        checkpoint: checkpoint folder, run folder or ``.safetensors`` file.
        device: where to put the model.

    Returns:
        The VATT model in eval mode.
    """
    from vatt_fast.models.vatt import VATT

    path = resolve_checkpoint(checkpoint)
    weights_file = path if path.is_file() else path / WEIGHTS_NAME
    config = read_weights_config(weights_file)
    if config is None:
        raise ValueError(
            f"{str(weights_file)!r} carries no model config in its metadata; it was not written by vatt_fast "
            f"(vatt_fast.checkpoint.save_weights); load it into create_model(...) yourself"
        )
    model = VATT(config)
    model.load_state_dict(load_weights(weights_file), strict=True)
    return model.to(device).eval()


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader: Any, device: torch.device, precision: str) -> Dict[str, torch.Tensor]:
    """Pooled ``video_features`` [N, Dv], ``audio_features`` [N, Da] and ``label`` [N] over one pass of ``loader``."""
    model.eval()
    feats: Dict[str, list] = {"video_features": [], "audio_features": [], "label": [], "index": []}
    for batch in loader:
        if "label" not in batch:
            raise ValueError("the dataset has no labels (manifest rows without 'label'); the linear probe needs them")
        inputs = {k: batch[k].to(device, non_blocking=True) for k in ("video", "audio")}
        with autocast(device, precision):
            out = model(inputs)
        feats["video_features"].append(out["video_features"].float().cpu())
        feats["audio_features"].append(out["audio_features"].float().cpu())
        feats["label"].append(batch["label"].cpu())
        feats["index"].append(batch["index"].cpu())
    return {k: torch.cat(v) for k, v in feats.items()}


def _probe(model, data: Path, args, device, precision, loader_kw) -> Dict[str, Any]:
    from vatt_fast.data.loader import build_loader

    out: Dict[str, Any] = {}
    split_feats = {}
    for split in (args.train_split, args.split):
        loader = build_loader(data, split, args.batch_size, train=False, drop_last=False, **loader_kw)
        try:
            split_feats[split] = extract_features(model, loader, device, precision)
        finally:
            loader.close() if hasattr(loader, "close") else None
    tr, te = split_feats[args.train_split], split_feats[args.split]
    keep_tr, keep_te = tr["label"] >= 0, te["label"] >= 0
    if not bool(keep_tr.any()) or not bool(keep_te.any()):
        raise ValueError(
            f"linear probe needs labelled clips in both splits: {int(keep_tr.sum())} labelled in {args.train_split!r}, "
            f"{int(keep_te.sum())} in {args.split!r}; add 'label' to the manifest rows"
        )
    for name in ("video", "audio"):
        key = f"{name}_features"
        out[name] = linear_probe(tr[key][keep_tr], tr["label"][keep_tr], te[key][keep_te], te["label"][keep_te],
                                 weight_decay=args.probe_weight_decay)  # fmt: skip
    out["train_clips"], out["test_clips"] = int(keep_tr.sum()), int(keep_te.sum())
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the evaluation the command line asks for; returns (and prints) the results."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    ckpt = resolve_checkpoint(args.checkpoint)
    meta = read_meta(ckpt) if ckpt.is_dir() else {}
    data = args.data or meta.get("args", {}).get("data")
    if data is None:
        raise ValueError(f"--data is needed: checkpoint {str(ckpt)!r} does not record its dataset")
    data = Path(data).expanduser()
    check_data(data, args.split)
    from vatt_fast.data.vocab import Vocabulary

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    model = load_model(str(ckpt), device)
    config = model.config
    vocab_size = len(Vocabulary.load(data / "vocab.txt"))
    if args.task == "retrieval" and vocab_size != config.vocab_size:
        raise ValueError(
            f"dataset {str(data)!r} has a vocabulary of {vocab_size} words but the checkpoint was trained with "
            f"{config.vocab_size}; text ids would mean other words. Prepare the dataset with the training run's "
            f"vocab.txt (copied into the run folder), or evaluate with --task linear-probe (no text)"
        )
    run_vocab = (ckpt.parent.parent / "vocab.txt") if ckpt.is_dir() else None
    if args.task == "retrieval" and run_vocab is not None and run_vocab.is_file():
        if run_vocab.read_text() != (data / "vocab.txt").read_text():
            raise ValueError(
                f"{str(data / 'vocab.txt')!r} differs from the training run's {str(run_vocab)!r}: the same ids would "
                f"mean other words; prepare the dataset with the run's vocab.txt"
            )
    model.set_attention_backend(args.attention)
    model.set_kernel_impl(args.kernels)
    loader_kw = dict(preset=config, backend=args.loader, num_workers=args.workers, seed=0, rank=0, world_size=1)
    results: Dict[str, Any] = {"checkpoint": str(ckpt), "data": str(data), "task": args.task, "split": args.split}
    if args.task == "retrieval":
        from vatt_fast.data.loader import build_loader

        loader = build_loader(data, args.split, args.batch_size, train=False, drop_last=False, **loader_kw)
        try:
            ret = evaluate(model, loader, device, precision, shard_gather=False)
        finally:
            loader.close() if hasattr(loader, "close") else None
        results.update(ret)
        print(f"Zero-shot retrieval on {args.split!r} ({int(ret['chance']['candidates'])} clips; R@K in %):")
        print(format_retrieval_table(ret))
    else:
        probe = _probe(model, data, args, device, precision, loader_kw)
        results.update(probe)
        print(f"Linear probe ({probe['train_clips']} train / {probe['test_clips']} test clips, "
              f"{int(probe['video']['num_classes'])} classes): accuracy in %")  # fmt: skip
        print("features  accuracy  train   chance")
        for name in ("video", "audio"):
            r = probe[name]
            print(f"{name:<9} {100 * r['accuracy']:8.1f}  {100 * r['train_accuracy']:6.1f}  {100 * r['chance']:6.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


def cli() -> None:
    """Console entry point ``vatt-eval``: errors become one line and exit status 1."""
    try:
        main()
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
