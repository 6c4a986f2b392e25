"""`di-router compile`: the tutorial's compile.sh command, generated and validated."""

from __future__ import annotations

import shlex

import pytest

from di_router.launcher.compile_cmd import buckets, compile_argv
from di_router.launcher.settings import LaunchError
from tests.launcher.launcher_helpers import run_launcher, settings

# compile.sh from the tutorial, with its variables filled in for the single-instance run.
TUTORIAL_COMPILE = """
inference_demo --model-type llama --task-type causal-lm run
  --model-path /models/llama --compiled-model-path di_traced_model_tp32_b4/
  --torch-dtype bfloat16 --tp-degree 32 --batch-size 4 --ctx-batch-size 1 --tkg-batch-size 4
  --is-continuous-batching --max-context-length 8192 --seq-len 8192 --on-device-sampling
  --fused-qkv --global-topk 256 --dynamic --top-k 50 --top-p 0.9 --temperature 0.7
  --do-sample --sequence-parallel-enabled --qkv-kernel-enabled --attn-kernel-enabled
  --mlp-kernel-enabled --cc-pipeline-tiling-factor 1 --pad-token-id 2 --logical-neuron-cores 2
  --context-encoding-buckets 256 512 1024 2048 4096 8192
  --token-generation-buckets 512 1024 2048 4096 8192 --apply-seq-ids-mask --enable-bucketing
  --prompt "test prompt" --save-sharded-checkpoint --attn-block-tkg-nki-kernel-enabled
  --attn-block-tkg-nki-kernel-cache-update --k-cache-transposed --async-mode --compile-only
"""


def test_single_instance_command_is_the_tutorials() -> None:
    got = compile_argv(settings(["compile", "--model-path", "/models/llama", "--batch-size", "4"]))
    assert got == shlex.split(TUTORIAL_COMPILE)


def test_multi_instance_compiles_tp64_into_the_conventional_folder() -> None:
    got = compile_argv(settings(["compile", "--model-path", "/m", "--topology", "multi-instance"]))
    assert got[got.index("--tp-degree") + 1] == "64"
    assert got[got.index("--compiled-model-path") + 1] == "di_traced_model_tp64_b4/"


def test_buckets_follow_the_sequence_length() -> None:
    assert buckets(256, 8192) == ["256", "512", "1024", "2048", "4096", "8192"]
    assert buckets(512, 3000) == ["512", "1024", "2048", "3000"]
    assert buckets(512, 256) == ["256"]
    got = compile_argv(settings(["compile", "--model-path", "/m", "--seq-len", "4096"]))
    assert got[got.index("--seq-len") + 1] == "4096"
    assert got[got.index("--max-context-length") + 1] == "4096"


def test_layout_is_checked_before_compiling() -> None:
    with pytest.raises(LaunchError, match="--tp-degree 64 x 2 servers"):
        compile_argv(settings(["compile", "--model-path", "/m", "--tp-degree", "64"]))


def test_dry_run_prints_a_script_that_parses_back_to_the_command() -> None:
    result = run_launcher("compile", "--model-path", "/my models/it's here", "--dry-run")
    assert result.returncode == 0, result.stderr
    command = result.stdout.split("\nexec ", 1)[1].replace("\\\n", " ")
    expected = compile_argv(settings(["compile", "--model-path", "/my models/it's here"]))
    assert shlex.split(command) == expected


def test_without_neuron_sdk_it_says_how_to_get_inference_demo(tmp_path) -> None:
    result = run_launcher("compile", "--model-path", "/m", PATH=str(tmp_path))
    assert result.returncode == 2
    assert "inference_demo is not on PATH: activate the Neuron venv" in result.stderr
