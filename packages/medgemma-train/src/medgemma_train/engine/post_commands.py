"""``medgemma-train distill``, ``rl``, ``teacher-logits`` and ``rewards`` (stage 3: post-training).

::

    medgemma-train distill --checkpoint student/ --data qa.jsonl --set distill.teacher=teacher/
    medgemma-train teacher-generate --teacher teacher/ --data questions.jsonl corpus.jsonl
    medgemma-train teacher-logits --teacher teacher/ --data qa.jsonl --top-k 64 logits/
    medgemma-train distill --checkpoint student/ --data qa.jsonl --set distill.logits=logits/
    medgemma-train rl --checkpoint sft-run/export/hf --data vqa.jsonl --set rl.rewards=[exact]
    medgemma-train rewards

The stage commands take every flag of ``sft`` (``--config``, ``--set``, ``--data``...); the
stage's own settings go in its section (``--set distill.alpha=0.7``, ``--set rl.beta=0.02``).
This module stays light (no JAX at import): ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..cli import Command
from .commands import _err, _train_args, _user_errors, resolve_config, run_stage

__all__ = ["DISTILL", "REWARDS", "RL", "TEACHER_GENERATE", "TEACHER_LOGITS"]

DISTILL = Command(
    "distill", "distillation from a teacher (online, or offline top-k logits files)",
    _train_args, lambda args: run_stage(args, "distill"),
    description="Distil a student from a teacher: alpha*T^2*KL(teacher_T || student_T) + "
                "(1-alpha)*CE over the answer tokens.\nSettings: --set distill.teacher=CK "
                "(online) or distill.logits=FOLDER (offline), distill.alpha, "
                "distill.temperature, distill.top_k.")

RL = Command(
    "rl", "GRPO reinforcement learning on text or image-text prompts, reward plugins",
    _train_args, lambda args: run_stage(args, "rl"),
    description="GRPO: G samples per prompt from the current policy, group-normalised "
                "rewards, clipped ratio + k3 KL to the frozen reference.\nSettings: "
                "--set rl.group_size=8 rl.epsilon=0.2 rl.beta=0.04 rl.rewards=[exact,format] "
                "rl.max_new_tokens=32 (medgemma-train rewards lists the rewards).")


def _teacher_args(p: argparse.ArgumentParser) -> None:
    _train_args(p)
    p.add_argument("--teacher", required=True, help="the teacher checkpoint")
    p.add_argument("--top-k", type=int, default=64, help="logits kept per token (default 64)")
    p.add_argument("--logits-dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--shard-rows", type=int, default=1024, help="rows per shard file")
    p.add_argument("logits_out", metavar="OUT", help="folder to write")


def _teacher_run(args: argparse.Namespace) -> int:
    from .teacher_logits import write_teacher_logits

    if not args.checkpoint:
        args.checkpoint = args.teacher  # the processor is the teacher's (shared vocabulary)
    cfg, _ = resolve_config(args, "distill")
    try:
        meta = write_teacher_logits(cfg, args.teacher, args.logits_out, top_k=args.top_k,
                                    logits_dtype=args.logits_dtype, shard_rows=args.shard_rows,
                                    batch_size=cfg.data.batch_size,
                                    say=None if args.json else (
                                        lambda t: print(t, file=sys.stderr)))
    except (*_user_errors(), ValueError) as exc:
        raise _err(exc) from None
    if args.json:
        print(json.dumps(meta))
    else:
        print(f"{meta['rows']} rows, {meta['tokens']} tokens, top-{meta['top_k']} of "
              f"{meta['vocab']}: {meta['bytes_per_token']} bytes per token "
              f"({meta['bytes'] / max(1, meta['tokens']):.1f} on disk), {meta['shards']} "
              f"shard(s) in {args.logits_out}")
    return 0


TEACHER_LOGITS = Command(
    "teacher-logits", "write a teacher's top-k logits per answer token for offline distill",
    _teacher_args, _teacher_run,
    description="Encode every row of --data/--eval-data as the distill stage does and "
                "store the teacher's top-k logits and ids per counted token in sharded .npz "
                "files; the storage per token is reported.")


def _generate_args(p: argparse.ArgumentParser) -> None:
    _train_args(p)
    p.add_argument("--teacher", required=True, help="the teacher checkpoint")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("corpus_out", metavar="OUT", help="chat JSONL file to write")


def _generate_run(args: argparse.Namespace) -> int:
    from .corpus import teacher_generate

    if not args.checkpoint:
        args.checkpoint = args.teacher
    cfg, _ = resolve_config(args, "distill")
    try:
        meta = teacher_generate(cfg, args.teacher, args.corpus_out,
                                max_new_tokens=args.max_new_tokens,
                                batch=cfg.data.batch_size, temperature=args.temperature,
                                seed=args.seed, say=None if args.json else (
                                    lambda t: print(t, file=sys.stderr)))
    except (*_user_errors(), ValueError) as exc:
        raise _err(exc) from None
    print(json.dumps(meta) if args.json else
          f"{meta['rows']} teacher answers ({meta['truncated']} cut at --max-new-tokens) in "
          f"{meta['out']}")
    return 0


TEACHER_GENERATE = Command(
    "teacher-generate", "sample a teacher's answers to a question set (distillation corpus)",
    _generate_args, _generate_run,
    description="Answer every row of --data (its last assistant turn dropped) with the "
                "teacher, in batches of --batch-size with medgemma-core's batched "
                "generation, and write chat JSONL rows with the teacher's answers.")


def _rewards_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def _rewards_run(args: argparse.Namespace) -> int:
    from .rewards import list_rewards, reward_problems

    for name, description, who in list_rewards():
        print(json.dumps({"name": name, "description": description, "plugin": who})
              if args.json else f"{name:12} {who}: {description}")
    for problem in reward_problems():
        print(f"problem: {problem}", file=sys.stderr)
    return 0


REWARDS = Command("rewards", "list the rl stage's reward functions (built-in and plugins)",
                  _rewards_args, _rewards_run)

