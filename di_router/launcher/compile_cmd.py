"""`di-router compile`: the tutorial's `compile.sh` as a validated `inference_demo` command."""

from __future__ import annotations

import argparse
import os
import shutil

from di_router.launcher.settings import LaunchError, Settings, add_options, run
from di_router.launcher.shell import render_script
from di_router.launcher.topology import core_slots

COMPILE_OPTIONS = (
    "model_path",
    "compiled_model_path",
    "tp_degree",
    "batch_size",
    "seq_len",
    "topology",
    "instance_cores",
)


def buckets(smallest: int, seq_len: int) -> list[str]:
    """Powers of two from `smallest` up to, and always ending at, `seq_len`."""
    sizes = []
    size = smallest
    while size < seq_len:
        sizes.append(size)
        size *= 2
    return [str(s) for s in [*sizes, seq_len]]


def compile_argv(settings: Settings) -> list[str]:
    """Every flag the tutorial compiles DI models with; `--apply-seq-ids-mask` is the DI one."""
    if not settings.model_path:
        raise LaunchError("--model-path is required: the Hugging Face checkpoint folder to compile")
    core_slots(settings)  # the layout must fit before an hour of compilation
    batch, seq = str(settings.batch_size), str(settings.seq_len)
    return [
        "inference_demo",
        "--model-type", "llama",
        "--task-type", "causal-lm",
        "run",
        "--model-path", settings.model_path,
        "--compiled-model-path", settings.compiled_model_path,
        "--torch-dtype", "bfloat16",
        "--tp-degree", str(settings.tp_degree),
        "--batch-size", batch,
        "--ctx-batch-size", "1",
        "--tkg-batch-size", batch,
        "--is-continuous-batching",
        "--max-context-length", seq,
        "--seq-len", seq,
        "--on-device-sampling",
        "--fused-qkv",
        "--global-topk", "256",
        "--dynamic",
        "--top-k", "50",
        "--top-p", "0.9",
        "--temperature", "0.7",
        "--do-sample",
        "--sequence-parallel-enabled",
        "--qkv-kernel-enabled",
        "--attn-kernel-enabled",
        "--mlp-kernel-enabled",
        "--cc-pipeline-tiling-factor", "1",
        "--pad-token-id", "2",
        "--logical-neuron-cores", "2",
        "--context-encoding-buckets", *buckets(256, settings.seq_len),
        "--token-generation-buckets", *buckets(512, settings.seq_len),
        "--apply-seq-ids-mask",
        "--enable-bucketing",
        "--prompt", "test prompt",
        "--save-sharded-checkpoint",
        "--attn-block-tkg-nki-kernel-enabled",
        "--attn-block-tkg-nki-kernel-cache-update",
        "--k-cache-transposed",
        "--async-mode",
        "--compile-only",
    ]  # fmt: skip


def compile_model(args: argparse.Namespace, settings: Settings) -> int:
    argv = compile_argv(settings)
    if args.dry_run:
        comment = f"di-router compile: tp {settings.tp_degree}, batch {settings.batch_size}"
        print(render_script(argv, {}, comment), end="")
        return 0
    if shutil.which(argv[0]) is None:
        raise LaunchError(
            "inference_demo is not on PATH: activate the Neuron venv, e.g. "
            "`source ~/aws_neuronx_venv_pytorch_2_7_nxd_inference/bin/activate`"
        )
    os.execvp(argv[0], argv)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "compile",
        help="compile a model for disaggregated inference",
        description="Compile with inference_demo into di_traced_model_tp<N>_b<B>/ by default.",
    )
    add_options(parser, COMPILE_OPTIONS)
    parser.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    parser.set_defaults(func=run("compile", compile_model))
