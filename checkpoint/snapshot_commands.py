"""`stalwart snapshot ...`: the operator's view of a job's snapshot daemons.

Each command returns (exit code, rows for a table or a JSON document). Exit codes: 0 all
well, 1 a problem found (a daemon unreachable, a checksum or parity mismatch, no such
snapshot), 2 the command could not run (bad arguments, token refused).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import grpc
import numpy as np

from checkpoint.daemon import read_token
from checkpoint.erasure import stripes
from checkpoint.proto import snapshot_pb2 as pb
from checkpoint.snapshot_client import SnapshotClient
from checkpoint.snapshot_group import pad_block
from checkpoint.snapshot_store import SnapshotError

OK, PROBLEM, FAILED = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job", required=True, help="the job's id")
    parser.add_argument("--daemons", required=True, help="every daemon of the job, by node index: host:port,...")
    parser.add_argument("--token-file", required=True, help="the job's token file (mode 0600)")
    parser.add_argument("--parity", type=int, default=1, help="the group's parity blocks per stripe (for verify)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    commands = parser.add_subparsers(dest="snapshot_command", required=True)
    commands.add_parser("status", help="every daemon: reachable, memory, snapshots held")
    commands.add_parser("ls", help="committed snapshots: step, size, ranks, daemons")
    commands.add_parser("set-peers", help="tell every daemon the group's addresses (--daemons), e.g. a replacement's")
    verify = commands.add_parser("verify", help="re-check every buffer's checksum and recompute the parity")
    verify.add_argument("step", type=int)
    rebuild = commands.add_parser("rebuild", help="rebuild a lost node's share on its replacement (or --on a survivor)")
    rebuild.add_argument("--node", type=int, required=True, help="the lost node")
    rebuild.add_argument("--on", type=int, help="a survivor to hold the share instead (its ranks fetch it there)")
    fetch = commands.add_parser("fetch", help="write one rank's buffers of a snapshot to an .npz file")
    fetch.add_argument("step", type=int)
    fetch.add_argument("--rank", type=int, required=True)
    fetch.add_argument("--out", required=True)
    drop = commands.add_parser("drop", help="drop a snapshot on every daemon")
    drop.add_argument("step", type=int)


def run(args: argparse.Namespace) -> int:
    try:
        token = read_token(args.token_file)
    except SnapshotError as e:
        print(f"stalwart snapshot: error: {e}")
        return FAILED
    clients = [SnapshotClient(a, args.job, token, deadline_s=30) for a in args.daemons.split(",")]
    command = args.snapshot_command
    try:
        if command == "status":
            code, result = status(clients)
        elif command == "ls":
            code, result = listing(clients)
        elif command == "set-peers":
            code, result = set_peers(clients, args.daemons.split(","))
        elif command == "verify":
            code, result = verify(clients, args.step, args.parity)
        elif command == "rebuild":
            if args.on is None:
                reply = clients[args.node].rebuild()
            else:
                reply = clients[args.on].rebuild(args.node)
            held_on = args.node if args.on is None else args.on
            code, result = OK, [{"node": args.node, "held_on": held_on, "step": reply.step, "bytes": reply.nbytes}]
        elif command == "fetch":
            code, result = fetch(clients, args.step, args.rank, Path(args.out))
        else:
            dropped = [n for n, c in enumerate(clients) if _try(lambda c=c: c.drop(args.step))]
            code, result = (OK if dropped else PROBLEM), [{"step": args.step, "dropped_on": dropped}]
    except grpc.RpcError as e:
        print(f"stalwart snapshot: error: {e.code().name}: {e.details()}")
        return FAILED if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) else PROBLEM
    finally:
        for c in clients:
            c.close()
    print(json.dumps(result, indent=1) if args.json else table(result))
    return code


def _try(call):
    """The call's result, or None if the daemon cannot answer; a refused token is raised."""
    try:
        return call()
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            raise
        return None


def status(clients: list[SnapshotClient]) -> tuple[int, list[dict]]:
    rows = []
    for node, client in enumerate(clients):
        reply = _try(client.status)
        if reply is None:
            rows.append({"node": node, "reachable": False})
            continue
        rows.append(
            {
                "node": node,
                "reachable": True,
                "ranks": list(reply.expected_ranks),
                "memory_used_mb": round(reply.memory_used / 2**20, 1),
                "memory_limit_mb": round(reply.memory_limit / 2**20, 1),
                "snapshots": [s.step for s in reply.snapshots],
            }
        )
    return (OK if all(r["reachable"] for r in rows) else PROBLEM), rows


def set_peers(clients: list[SnapshotClient], addresses: list[str]) -> tuple[int, list[dict]]:
    """Every reachable daemon learns the group's addresses; an unreachable one is a problem."""
    rows = []
    for node, client in enumerate(clients):
        told = _try(lambda c=client: c.set_peers(addresses)) is not None
        rows.append({"node": node, "address": addresses[node], "told": told})
    return (OK if all(r["told"] for r in rows) else PROBLEM), rows


def listing(clients: list[SnapshotClient]) -> tuple[int, list[dict]]:
    steps: dict[int, dict] = {}
    unreachable = False
    for node, client in enumerate(clients):
        held = _try(client.list)
        if held is None:
            unreachable = True
            continue
        for s in held:
            row = steps.setdefault(s.step, {"step": s.step, "bytes": 0, "ranks": [], "daemons": []})
            row["bytes"] += s.nbytes
            row["ranks"] += list(s.ranks)
            row["daemons"].append(node)
    return (PROBLEM if unreachable else OK), [steps[s] for s in sorted(steps)]


def verify(clients: list[SnapshotClient], step: int, parity: int) -> tuple[int, list[dict]]:
    """Every daemon re-checks its buffers; with a group, every stripe's parity is recomputed
    from its data blocks and compared with what the parity holders hold."""
    problems = []
    for node, client in enumerate(clients):
        try:
            reply = client.verify(step)
            problems += [f"node {node}: {p}" for p in reply.problems]
        except grpc.RpcError as e:
            problems.append(f"node {node}: {e.code().name}: {e.details()}")
    if len(clients) > 1 and not problems:
        problems += _parity_problems(clients, step, parity)
    rows = [{"step": step, "ok": not problems, "problems": problems}]
    return (PROBLEM if problems else OK), rows


def _parity_problems(clients: list[SnapshotClient], step: int, parity: int) -> list[str]:
    from checkpoint.erasure import make_code

    k = len(clients) - parity
    code = make_code(k, parity)
    problems = []
    for stripe in stripes(len(clients), parity):
        data = [_block(clients[n], step, stripe.index, parity=False) for n in stripe.data_nodes]
        held = [_block(clients[n], step, stripe.index, parity=True) for n in stripe.parity_nodes]
        length = max(len(b) for b in data + held)
        padded = [pad_block(b, length) for b in data]
        expected = [np.zeros(length, np.uint8) for _ in range(parity)]
        code.encode(padded, expected)
        for j, (node, block) in enumerate(zip(stripe.parity_nodes, held, strict=True)):
            if not np.array_equal(expected[j], pad_block(block, length)):
                problems.append(f"node {node}: parity {j} of stripe {stripe.index} does not match its data blocks")
    return problems


def _block(client: SnapshotClient, step: int, stripe: int, parity: bool) -> bytes:
    chunks = client.stub.GetBlock(
        pb.BlockRequest(step=step, stripe=stripe, parity=parity), timeout=client.deadline_s, metadata=client.metadata
    )
    return b"".join(c.data for c in chunks)


def fetch(clients: list[SnapshotClient], step: int, rank: int, out: Path) -> tuple[int, list[dict]]:
    for client in clients:
        reply = _try(client.status)
        if reply is not None and rank in reply.expected_ranks:
            buffers = client.fetch_streamed(step, rank)
            np.savez(out, **{name: np.frombuffer(data, np.uint8) for name, data in buffers.items()})
            size = sum(len(d) for d in buffers.values())
            return OK, [{"step": step, "rank": rank, "buffers": len(buffers), "bytes": size, "out": str(out)}]
    return PROBLEM, [{"step": step, "rank": rank, "error": "no reachable daemon holds this rank"}]


def table(rows: list[dict]) -> str:
    if not rows:
        return "(none)"
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(k, "")) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) if len(value) < 8 else f"{value[0]}..{value[-1]} ({len(value)})"
    return str(value)
