"""The commands that deploy a layout with this package's launchers (docs/launcher.md).

Hosts are placeholders (`HOST1`, ...): one trn2.48xlarge each. A TP32 pair shares one host
(prefill on cores 0-31, decode on 32-63, the launcher's single-instance split); a TP64 server has
a host of its own (multi-instance). P = D deploys as Neuron 2.24's fixed pairs; P != D needs
any-to-any pairing, which only Neuron 2.26's etcd discovery gives (docs/discovery.md).
"""

from __future__ import annotations

import re
import shlex

from di_router.argv import router_argv
from di_router.kv_config import NEURON_CONNECTOR, KVRole, KVTransferConfig
from di_router.plan.layouts import INSTANCE_CORES, Layout

ROUTER_PORT = 8000
ETCD = "ETCD_HOST:8989"
"""Neuron 2.26's tutorial runs etcd on client port 8989."""
_PLAIN = re.compile(r"[\w@%+=:,./~-]+")  # left unquoted, so the shell still expands `~`


def commands(layout: Layout, model_path: str) -> list[str]:
    """Shell lines, comments included, in the order to run them."""
    path = model_path if _PLAIN.fullmatch(model_path) else shlex.quote(model_path)
    common = f"--model-path {path} --tp-degree {layout.tp} "
    common += f"--batch-size {layout.batch}"
    lines = [
        "# on every host: compile once (the artifact serves both roles)",
        f"di-router compile {common}",
    ]
    if layout.kind == "baseline":
        return lines + _baseline(layout, common)
    if not layout.static_pairing:
        return lines + _dynamic(layout)
    if layout.tp * 2 <= INSTANCE_CORES:
        return lines + _single_instance_pairs(layout, common)
    return lines + _multi_instance_pairs(layout, common)


def _baseline(layout: Layout, common: str) -> list[str]:
    per_host = INSTANCE_CORES // layout.tp
    lines, urls = [], []
    for i in range(layout.servers):
        host, slot = f"HOST{i // per_host + 1}", i % per_host
        if slot == 0:
            lines.append(f"# on {host}")
        if layout.tp == INSTANCE_CORES:
            lines.append(f"di-router serve baseline --topology multi-instance {common}")
        elif slot == 0:
            lines.append(f"di-router serve baseline {common} &")
        else:
            cores = f"{slot * layout.tp}-{(slot + 1) * layout.tp - 1}"
            lines.append(
                f"di-router serve baseline {common} --prefill-cores {cores} "
                f"--decode-cores 0-{layout.tp - 1} --baseline-port {ROUTER_PORT + slot}"
            )
        urls.append(f"http://{host}:{ROUTER_PORT + slot}")
    lines.append(
        "# no router: clients take the servers in turn, e.g. "
        f"di-router bench --url '{';'.join(urls)}'"
    )
    return lines


def _router(pairs: list[tuple[str, str]]) -> str:
    """The router's command as a user types it, spelled by the one router argv builder."""
    urls = [(f"http://{p}", f"http://{d}") for p, d in pairs]
    argv = router_argv("0.0.0.0", ROUTER_PORT, urls)
    return shlex.join(["neuron-proxy-server", *argv[3:]])  # the console script, not -m


def _single_instance_pairs(layout: Layout, common: str) -> list[str]:
    if layout.prefills == 1:
        return [
            "# on HOST1: prefill (cores 0-31), decode (cores 32-63) and the router on :8000",
            f"di-router up {common}",
        ]
    lines = []
    for i in range(1, layout.prefills + 1):
        lines += [
            f"# on HOST{i}: one pair (prefill cores 0-31, decode cores 32-63)",
            f"di-router serve prefill {common} &",
            f"di-router serve decode {common} &",
        ]
    pairs = [(f"HOST{i}:8100", f"HOST{i}:8200") for i in range(1, layout.prefills + 1)]
    return [*lines, "# the router (on any host)", _router(pairs)]


def _multi_instance_pairs(layout: Layout, common: str) -> list[str]:
    lines, pairs = [], []
    for i in range(layout.prefills):
        p_host, d_host = f"HOST{2 * i + 1}", f"HOST{2 * i + 2}"
        ips = f"--prefill-ip {p_host}_IP --decode-ip {d_host}_IP"
        lines += [
            f"# on {p_host}",
            f"di-router serve prefill --topology multi-instance {common} {ips}",
            f"# on {d_host}",
            f"di-router serve decode --topology multi-instance {common} {ips}",
        ]
        pairs.append((f"{p_host}_IP:8100", f"{d_host}_IP:8200"))
    return [*lines, "# the router (on a prefill host)", _router(pairs)]


def etcd_kv_config(role: str, etcd: str) -> KVTransferConfig:
    """A Neuron 2.26 worker's `--kv-transfer-config`: its role and the etcd it registers in
    (the fields the 2.26 tutorial passes); the simulator takes the same."""
    kv_role: KVRole = "kv_producer" if role == "prefill" else "kv_consumer"
    return KVTransferConfig(kv_connector=NEURON_CONNECTOR, kv_role=kv_role, etcd=etcd)


def _dynamic(layout: Layout) -> list[str]:
    """P != D: every worker registers in etcd and the router follows the registry."""
    lines = [
        f"# {layout.prefills}P{layout.decodes}D pairs any prefill with any decode: Neuron 2.26's "
        "dynamic xPyD with etcd discovery (docs/discovery.md: run one etcd member on ETCD_HOST);",
        "# `di-router serve` launches Neuron 2.24's fixed pairs only, so start each worker as "
        "vLLM's api_server with",
    ]
    for role, count in (("prefill", layout.prefills), ("decode", layout.decodes)):
        config = shlex.quote(etcd_kv_config(role, ETCD).to_cli_json())
        flags = f"--tensor-parallel-size {layout.tp} --max-num-seqs {layout.batch}"
        lines.append(f"#   {count}x {role}: {flags} --kv-transfer-config {config}")
    argv = router_argv("0.0.0.0", ROUTER_PORT, [], ["--etcd", ETCD])
    return [*lines, "# the router", shlex.join(["neuron-proxy-server", *argv[3:]])]
