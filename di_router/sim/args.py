"""The simulator's command line: vLLM's flags (as the Neuron tutorial passes them) + `--sim-*`.

Flags vLLM accepts but that change nothing in a simulation are accepted and ignored, so a server
script written for vLLM runs by swapping the module name. Unknown flags are an error, as in vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence

from di_router.kv_config import KVTransferConfig, parse_kv_transfer_config, visible_cores_from_env
from di_router.settings import SIM_PREFIX, parse_args
from di_router.sim.faults import add_fault_arguments, fault_settings
from di_router.sim.profiles import DEFAULT_PROFILE, PROFILES
from di_router.sim.settings import SimSettings

# vLLM flags with no effect on the simulation: name -> takes a value.
_ACCEPTED_VLLM_FLAGS: dict[str, bool] = {
    "--device": True,
    "--use-v2-block-manager": False,
    "--block-size": True,
    "--dtype": True,
    "--tokenizer": True,
    "--trust-remote-code": False,
    "--seed": True,
    "--swap-space": True,
    "--gpu-memory-utilization": True,
    "--disable-log-requests": False,
    "--disable-log-stats": False,
    "--enable-request-id-headers": False,
    "--uvicorn-log-level": True,
    "--max-num-batched-tokens": True,
    "--enable-chunked-prefill": True,
    "--enable-prefix-caching": False,
    "--disable-frontend-multiprocessing": False,
    "--pipeline-parallel-size": True,
    "--num-scheduler-steps": True,
    "--quantization": True,
}

_SIM_OVERRIDES = {
    "prefill_base_ms": "fixed cost of one prefill (ms)",
    "prefill_per_token_us": "prefill cost per prompt token (us)",
    "decode_base_ms": "fixed cost of one decode step (ms)",
    "decode_per_seq_ms": "extra decode-step cost per running sequence (ms)",
    "kv_setup_ms": "fixed cost of one KV transfer (ms)",
    "kv_bytes_per_token": "KV-cache bytes per token (Llama-3.3-70B bf16: 327680)",
    "kv_replication": "copies of each KV head sent (GQA replication across TP ranks)",
    "link_gbps": "KV link bandwidth in GB/s (EFA on trn2.48xlarge: 400)",
    "link_efficiency": "fraction of the link bandwidth achieved",
}


def build_parser(prog: str = "python -m di_router.sim.api_server") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="vLLM 0.7.2 (Neuron fork) OpenAI server simulator. Same flags as "
        "`python3 -m vllm.entrypoints.openai.api_server`; simulator-only flags start with --sim-.",
    )
    p.add_argument("--model", default="llama-3.3-70b", help="model name or path (not loaded)")
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument(
        "--max-num-seqs", type=int, default=256, help="batch slots (continuous batching)"
    )
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--override-neuron-config", type=json.loads, default=None)
    p.add_argument("--kv-transfer-config", default=None, help="KVTransferConfig JSON")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"))
    p.add_argument("--ssl-keyfile", default=None, help="private key: listen on HTTPS")
    p.add_argument("--ssl-certfile", default=None, help="certificate (with --ssl-keyfile)")
    for flag, takes_value in _ACCEPTED_VLLM_FLAGS.items():
        if takes_value:
            p.add_argument(flag, help=argparse.SUPPRESS)
        else:
            p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    sim = p.add_argument_group("simulator")
    sim.add_argument("--sim-profile", choices=sorted(PROFILES), default=DEFAULT_PROFILE)
    for name, doc in _SIM_OVERRIDES.items():
        sim.add_argument(
            f"--sim-{name.replace('_', '-')}",
            type=float,
            default=None,
            help=f"override the profile: {doc}",
        )
    sim.add_argument(
        "--sim-kv-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="departs from vLLM: a decode request whose KV has not come within SECONDS fails "
        "with 500 and frees its slot (0, the default: it waits forever, as vLLM does)",
    )
    sim.add_argument(
        "--sim-abort-transferring",
        action="store_true",
        help="departs from vLLM: a client abort also frees a decode request still waiting for "
        "its KV (vLLM's Scheduler.abort_seq_group never scans `transferring`)",
    )
    sim.add_argument(
        "--sim-kv-handshake-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="departs from vLLM: exit with an error if the KV producer/consumer have not paired "
        "within SECONDS (0, the default: wait forever, as vLLM's ZMQ handshake does)",
    )
    sim.add_argument(
        "--sim-kv-entry-ttl",
        type=float,
        default=0.0,
        help="seconds an unpulled prefill entry pins its slot (0: forever, as vLLM)",
    )
    sim.add_argument(
        "--sim-eos-probability",
        type=float,
        default=0.0,
        help="chance that a sampled token is EOS (0: never; tests use it for finish_reason=stop)",
    )
    add_fault_arguments(p)
    return p


def settings_from_args(args: argparse.Namespace) -> tuple[SimSettings, list[str]]:
    """Validated settings plus warnings; ValueError names the flag or field at fault."""
    warnings: list[str] = []
    kv: KVTransferConfig | None = None
    if args.kv_transfer_config:
        kv = parse_kv_transfer_config(args.kv_transfer_config)
        notes = (
            kv.core_offset_warning(visible_cores_from_env()),
            kv.send_ip_warning(os.environ.get("NEURON_SEND_IP")),
        )
        warnings += [note for note in notes if note]
        if kv.kv_role and not kv.kv_connector:
            warnings.append(f"kv_role={kv.kv_role} without kv_connector: running as baseline")
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together")
    for flag in ("max_num_seqs", "max_model_len", "port"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("sim_kv_timeout", "sim_kv_handshake_timeout"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must not be negative")
    if not 0.0 <= args.sim_eos_probability <= 1.0:
        raise ValueError("--sim-eos-probability must be between 0 and 1")
    overrides = {name: getattr(args, f"sim_{name}") for name in _SIM_OVERRIDES}
    for key in ("kv_bytes_per_token", "kv_replication"):
        if overrides[key] is not None:
            overrides[key] = int(overrides[key])
    profile = PROFILES[args.sim_profile].with_overrides(**overrides)
    settings = SimSettings(
        model=args.model,
        served_model_names=tuple(args.served_model_name or ()),
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        kv_config=kv,
        profile=profile,
        kv_timeout_s=args.sim_kv_timeout,
        abort_transferring=args.sim_abort_transferring,
        kv_handshake_timeout_s=args.sim_kv_handshake_timeout,
        kv_entry_ttl_s=args.sim_kv_entry_ttl,
        eos_probability=args.sim_eos_probability,
        faults=fault_settings(args),
    )
    return settings, warnings


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ
) -> tuple[SimSettings, list[str]]:
    """Flags over `DI_SIM_*` variables over the TOML file `DI_SIM_CONFIG` (`di_router.settings`;
    no `--config` flag, which vLLM spends on its own YAML file)."""
    parser = build_parser()
    try:
        args = parse_args(parser, argv, SIM_PREFIX, environ)
        return settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
