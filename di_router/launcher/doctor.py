"""`di-router doctor`: the preflight checks that turn the tutorial's known failures into fixes.

Each check looks at the real system (files, devices, sockets, packages) for what the Neuron
runtime or vLLM would otherwise report minutes into a launch, or not at all.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pwd
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from di_router.kv_config import DEFAULT_KV_PORT, KVTransferConfig
from di_router.launcher.ports import busy_port_problems
from di_router.launcher.settings import LaunchError, Settings, add_options, compiled_model_dir, run
from di_router.launcher.topology import core_slots

EFA_SYSFS = Path("/sys/class/infiniband")
KV_PROBE_TIMEOUT_S = 2.0
NEURON_VENV_HINT = "source ~/aws_neuronx_venv_pytorch_2_7_nxd_inference/bin/activate"
DOCTOR_OPTIONS = (
    "model_path",
    "compiled_model_path",
    "tp_degree",
    "batch_size",
    "topology",
    "engine",
    "prefill_port",
    "decode_port",
    "router_port",
    "prefill_ip",
    "kv_port",
    "prefill_cores",
    "decode_cores",
    "instance_cores",
    "kv_lock_file",
)


@dataclass(frozen=True)
class Finding:
    problem: str
    fix: str | None = None
    """None when the problem text already names the flag and the fix."""


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_kv_lock(settings: Settings) -> list[Finding]:
    """The tutorial's known issue: another user's lock file makes the runtime fail to start."""
    path = Path(settings.kv_lock_file)
    try:
        os.close(os.open(path, os.O_RDWR))
    except FileNotFoundError:
        return []
    except PermissionError:
        return [
            Finding(
                f"{path} belongs to {_user_name(path.stat().st_uid)} and "
                f"{_user_name(os.geteuid())} cannot open it; the Neuron runtime will fail with "
                "'kv_store_acquire_file_lock Failed to open kv store server lock file "
                "Permission denied'",
                f"once no DI server is running: sudo rm {path}",
            )
        ]
    return []


def check_efa(settings: Settings) -> list[Finding]:
    """KV moves over EFA even between two servers on one instance."""
    drivers = (device / "device" / "driver" for device in EFA_SYSFS.glob("*"))
    if any(driver.resolve().name == "efa" for driver in drivers):
        return []
    return [
        Finding(
            f"no EFA device (nothing under {EFA_SYSFS} uses the efa driver); disaggregated "
            "inference transfers KV over EFA, even on a single instance",
            "run on an EFA-enabled trn2.48xlarge or trn1.32xlarge (the Neuron DLAMI installs "
            "the driver): https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/efa-start.html",
        )
    ]


def check_packages(settings: Settings) -> list[Finding]:
    return [
        Finding(
            f"{package} is not importable by {sys.executable}",
            f"activate the Neuron venv (`{NEURON_VENV_HINT}`) and install {package} per the "
            "Neuron vLLM user guide",
        )
        for module, package in (("vllm", "vllm (Neuron fork)"), ("neuronxcc", "neuronx-cc"))
        if importlib.util.find_spec(module) is None
    ]


def check_model(settings: Settings) -> list[Finding]:
    if settings.model_path is None:
        return [Finding("--model-path is not set; vLLM needs the Hugging Face checkpoint folder")]
    if not Path(settings.model_path).is_dir():
        return [
            Finding(
                f"--model-path {settings.model_path} is not a folder",
                "download the checkpoint there, e.g. `huggingface-cli download "
                f"meta-llama/Llama-3.3-70B-Instruct --local-dir {settings.model_path}`",
            )
        ]
    return []


def check_artifacts(settings: Settings) -> list[Finding]:
    """vLLM loads NEURON_COMPILED_ARTIFACTS as compiled; a mismatch fails late or misbehaves."""
    path = settings.compiled_model_path
    compile_fix = (
        f"di-router compile --model-path {settings.model_path or 'MODEL'} "
        f"--tp-degree {settings.tp_degree} --batch-size {settings.batch_size} "
        f"--compiled-model-path {path}"
    )
    if not Path(path).is_dir():
        return [Finding(f"--compiled-model-path {path} does not exist", compile_fix)]
    try:
        saved = json.loads((Path(path) / "neuron_config.json").read_text())
    except (OSError, ValueError) as exc:
        return [Finding(f"{path} has no readable neuron_config.json ({exc})", compile_fix)]
    neuron_config = saved.get("neuron_config", saved)
    built = (neuron_config.get("tp_degree"), neuron_config.get("batch_size"))
    if built == (settings.tp_degree, settings.batch_size):
        return []
    tp, batch = built
    return [
        Finding(
            f"{path} was compiled for tp_degree {tp}, batch_size {batch} but the servers use "
            f"--tp-degree {settings.tp_degree} --batch-size {settings.batch_size}",
            f"compile for these settings ({compile_fix}), or serve the existing one with "
            f"--tp-degree {tp} --batch-size {batch} --compiled-model-path "
            f"{compiled_model_dir(tp, batch)}",
        )
    ]


def check_ports(settings: Settings) -> list[Finding]:
    ports = {
        "--prefill-port": settings.prefill_port,
        "--decode-port": settings.decode_port,
        "--router-port": settings.router_port,
        "--kv-port": settings.kv_port or DEFAULT_KV_PORT,
    }
    return [Finding(problem) for problem in busy_port_problems(ports)]


def check_kv_peer(settings: Settings) -> list[Finding]:
    """A decode host's consumer pairs with `kv_ip:kv_port` before it serves, with no timeout: a
    wrong address means a server that never becomes healthy. Probe it (multi-instance, where
    the producer runs elsewhere and should be up already)."""
    if settings.single_instance or settings.prefill_ip is None:
        return []
    address = (settings.prefill_ip, settings.kv_port or DEFAULT_KV_PORT)
    try:
        socket.create_connection(address, timeout=KV_PROBE_TIMEOUT_S).close()
        return []
    except ConnectionRefusedError:
        reason = "connection refused: nothing listens there"
    except TimeoutError:
        reason = f"no answer within {KV_PROBE_TIMEOUT_S:g} s (wrong IP, or a firewall drops it)"
    except OSError as exc:
        reason = exc.strerror or str(exc)
    return [
        Finding(
            f"the decode server cannot reach its KV producer at {address[0]}:{address[1]} "
            f"(kv_ip:kv_port): {reason}; it would wait to pair forever and never serve",
            "start the prefill server first; check --prefill-ip and --kv-port against the "
            "prefill host's, and that its security group allows TCP to that port",
        )
    ]


def check_cores(settings: Settings) -> list[Finding]:
    try:
        core_slots(settings)
    except LaunchError as exc:
        return [Finding(str(exc))]
    # Multi-instance servers set no core range of their own, so they inherit the shell's.
    inherited = os.environ.get("NEURON_RT_VISIBLE_CORES")
    if settings.single_instance or settings.prefill_cores or settings.decode_cores:
        return []
    warning = KVTransferConfig(neuron_core_offset=0).core_offset_warning(inherited)
    if warning is None:
        return []
    return [
        Finding(
            f"this shell exports NEURON_RT_VISIBLE_CORES, which multi-instance servers inherit: "
            f"{warning}",
            "unset NEURON_RT_VISIBLE_CORES, or state the range with --prefill-cores/--decode-cores",
        )
    ]


Check = Callable[[Settings], list[Finding]]
CHECKS: dict[str, tuple[Check, bool]] = {
    # name -> (check, needs real Trainium: skipped for --engine sim)
    "kv-store lock": (check_kv_lock, True),
    "efa": (check_efa, True),
    "packages": (check_packages, True),
    "model": (check_model, True),
    "compiled artifacts": (check_artifacts, True),
    "ports": (check_ports, False),
    "kv peer": (check_kv_peer, False),
    "cores": (check_cores, False),
}


def doctor(args: argparse.Namespace, settings: Settings) -> int:
    print(
        f"di-router doctor: {settings.topology}, engine {settings.engine}, "
        f"tp {settings.tp_degree}, batch {settings.batch_size}"
    )
    problems = 0
    for name, (check, trainium_only) in CHECKS.items():
        if trainium_only and settings.engine == "sim":
            print(f"  skip  {name} (not needed by the simulator)")
            continue
        findings = check(settings)
        problems += len(findings)
        if not findings:
            print(f"  ok    {name}")
        for finding in findings:
            print(f"  FAIL  {name}: {finding.problem}")
            if finding.fix:
                print(f"        fix: {finding.fix}")
    print(f"{problems} problem(s) found" if problems else "all checks passed")
    return 1 if problems else 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="preflight checks, each with a fix",
        description="Check this host for what would make a DI launch fail, and say how to fix it.",
    )
    add_options(parser, DOCTOR_OPTIONS)
    parser.set_defaults(func=run("doctor", doctor))
