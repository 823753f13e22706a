"""`stalwart snapshot ...`: the operator's view of a job's snapshot daemons.

Each command returns (exit code, rows for a table or a JSON document). Exit codes: 0 all
well, 1 a problem found (a daemon unreachable, a checksum or parity mismatch, no such
snapshot), 2 the command could not run (bad arguments, token refused).
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
from pathlib import Path

import grpc
import numpy as np

from checkpoint.block_transport import BlockRefused
from checkpoint.daemon import read_token
from checkpoint.erasure import stripes
from checkpoint.proto import snapshot_pb2 as pb
from checkpoint.snapshot_client import SnapshotClient
from checkpoint.snapshot_group import pad_block
from checkpoint.snapshot_store import SnapshotError
from checkpoint.universal import step_dir_name

OK, PROBLEM, FAILED = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", help="a running job's run directory: job, daemons, token file and parity from its daemons.json"
    )
    parser.add_argument("--job", help="the job's id")
    parser.add_argument("--daemons", help="every daemon of the job, by node index: host:port,...")
    parser.add_argument("--token-file", help="the job's token file (mode 0600)")
    parser.add_argument("--parity", type=int, default=None, help="the group's parity blocks per stripe (for verify)")
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
    rebuild.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the parity to follow")
    fetch = commands.add_parser("fetch", help="write one rank's buffers of a snapshot to an .npz file")
    fetch.add_argument("step", type=int)
    fetch.add_argument("--rank", type=int, required=True)
    fetch.add_argument("--out", required=True)
    materialize = commands.add_parser(
        "materialize", help="write a committed snapshot as a universal checkpoint: OUT/step_<STEP>, then OUT/latest"
    )
    materialize.add_argument("step", help="a step, or `latest`: the newest every daemon holds")
    materialize.add_argument("out", help="a checkpoints directory, e.g. runs/demo/checkpoints")
    materialize.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for every daemon")
    drop = commands.add_parser("drop", help="drop a snapshot on every daemon")
    drop.add_argument("step", type=int)


DAEMONS_FILE = "daemons.json"
"""Written into the run directory by a launcher while its daemons serve (see `--run`)."""


def _job_from_run_dir(args: argparse.Namespace) -> None:
    """Fill --job, --daemons, --token-file and --parity from the run directory's daemons.json."""
    if args.run:
        path = Path(args.run) / DAEMONS_FILE
        try:
            job = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SnapshotError("invalid", f"{path}: no running job's daemons here ({e})") from e
        args.job = args.job or job["job"]
        args.daemons = args.daemons or ",".join(job["daemons"])
        args.token_file = args.token_file or job["token_file"]
        args.parity = args.parity if args.parity is not None else job["parity"]
    missing = [flag for flag, value in (("--job", args.job), ("--daemons", args.daemons)) if not value]
    if missing or not args.token_file:
        raise SnapshotError("invalid", f"give --run RUN_DIR, or {', '.join(missing or ['--token-file'])}")
    args.parity = 1 if args.parity is None else args.parity


def run(args: argparse.Namespace) -> int:
    try:
        _job_from_run_dir(args)
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
            code, result = rebuild(clients, args.node, args.on, args.timeout)
        elif command == "fetch":
            code, result = fetch(clients, args.step, args.rank, Path(args.out))
        elif command == "materialize":
            code, result = materialize(clients, args.step, Path(args.out), args.timeout)
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
        try:
            problems += _parity_problems(clients, step, parity)
        except (grpc.RpcError, BlockRefused, OSError) as e:
            problems.append(f"the parity could not be checked: {e}")
    rows = [{"step": step, "ok": not problems, "problems": problems}]
    return (PROBLEM if problems else OK), rows


def _parity_problems(clients: list[SnapshotClient], step: int, parity: int) -> list[str]:
    from checkpoint.erasure import make_code

    k = len(clients) - parity
    code = make_code(k, parity)
    problems = []
    for stripe in stripes(len(clients), parity):
        data = [clients[n].block(step, stripe.index, parity=False) for n in stripe.data_nodes]
        held = [clients[n].block(step, stripe.index, parity=True) for n in stripe.parity_nodes]
        length = max(len(b) for b in data + held)
        padded = [pad_block(b, length) for b in data]
        expected = [np.zeros(length, np.uint8) for _ in range(parity)]
        code.encode(padded, expected)
        for j, (node, block) in enumerate(zip(stripe.parity_nodes, held, strict=True)):
            if not np.array_equal(expected[j], pad_block(block, length)):
                problems.append(f"node {node}: parity {j} of stripe {stripe.index} does not match its data blocks")
    return problems


def rebuild(clients: list[SnapshotClient], node: int, on: int | None, timeout_s: float) -> tuple[int, list[dict]]:
    """Rebuild lost `node`'s share on its replacement (or hold it on survivor `on`). A
    replacement answers once the share is back, then recomputes the parity it held: this
    waits for that too, so that the group can lose a node again when it returns."""
    start = time.monotonic()
    holder = node if on is None else on
    reply = clients[holder].rebuild(None if on is None else node)
    row = {"node": node, "held_on": holder, "step": reply.step, "bytes": reply.nbytes}
    row["share_s"] = round(time.monotonic() - start, 3)
    if on is not None:
        return OK, [row]
    while (missing := missing_stripes(clients[node], reply.step)) and time.monotonic() - start < timeout_s:
        time.sleep(0.02)
    row["parity_s"] = round(time.monotonic() - start, 3)
    if missing:
        row["error"] = f"the parity of stripes {missing} did not follow within {timeout_s:.0f} s"
        return PROBLEM, [row]
    return OK, [row]


def missing_stripes(client: SnapshotClient, step: int) -> list[int] | None:
    """The stripes whose parity `client`'s daemon still lacks for `step`; None once it is gone."""
    state = next((s for s in client.status().steps if s.step == step), None)
    return None if state is None else list(state.missing_stripes)


def fetch(clients: list[SnapshotClient], step: int, rank: int, out: Path) -> tuple[int, list[dict]]:
    for client in clients:
        reply = _try(client.status)
        if reply is not None and rank in reply.expected_ranks:
            try:
                buffers = client.fetch_remote(step, rank)
            except (BlockRefused, OSError, ValueError) as e:  # dropped meanwhile, or the daemon went away
                return PROBLEM, [{"step": step, "rank": rank, "error": f"reading its buffers: {e}"}]
            np.savez(out, **{name: np.frombuffer(data, np.uint8) for name, data in buffers.items()})
            size = sum(len(d) for d in buffers.values())
            return OK, [{"step": step, "rank": rank, "buffers": len(buffers), "bytes": size, "out": str(out)}]
    return PROBLEM, [{"step": step, "rank": rank, "error": "no reachable daemon holds this rank"}]


def materialize(clients: list[SnapshotClient], step: str, out: Path, timeout_s: float) -> tuple[int, list[dict]]:
    """Every daemon writes its share of a committed step under OUT/step_<STEP>; the daemon that
    holds rank 0 commits it once all are written. Waits for every daemon to finish.

    `latest` takes the newest step every daemon has committed. In a live run a newer commit
    may drop it before the first daemon pins it: then the then newest is taken (nothing was
    started); once one daemon has pinned it, the others keep it for snapshot.keep - 1 commits.
    """
    for _ in range(3 if step == "latest" else 1):
        chosen = _newest_common_step(clients) if step == "latest" else int(step)
        if chosen is None:
            return PROBLEM, [{"step": step, "error": "no step is committed on every daemon"}]
        held = [next((s for s in client.list() if s.step == chosen), None) for client in clients]
        if any(h is None for h in held):
            missing = [node for node, h in enumerate(held) if h is None]
            return PROBLEM, [{"step": chosen, "error": f"step {chosen} is not committed on nodes {missing}"}]
        root = out.resolve() / step_dir_name(chosen)
        request = pb.MaterializeRequest(
            step=chosen, root=str(root), writer_token=secrets.token_hex(8), world_size=sum(len(h.ranks) for h in held)
        )
        request.keep, request.timeout_s = 1 << 30, timeout_s  # an operator's checkpoint deletes none
        try:
            clients[0].materialize(request)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND and step == "latest":
                continue  # dropped by a newer commit before it was pinned: take the newest again
            raise
        for client in clients[1:]:
            client.materialize(request)
        return _wait_written(clients, chosen, root, request.world_size, timeout_s)
    return PROBLEM, [{"step": step, "error": "every daemon's newest step was dropped before it could be pinned"}]


def _newest_common_step(clients: list[SnapshotClient]) -> int | None:
    steps = set.intersection(*({s.step for s in client.list()} for client in clients))
    return max(steps) if steps else None


def _wait_written(clients, step: int, root: Path, ranks: int, timeout_s: float) -> tuple[int, list[dict]]:
    started = time.monotonic()
    states: list[str] = []
    while time.monotonic() - started < timeout_s:
        records = [[m for m in c.status().materializations if m.root == str(root)][-1] for c in clients]
        states = [m.state for m in records]
        if "failed" in states:
            error = next(m.error for m in records if m.state == "failed")
            return PROBLEM, [{"step": step, "out": str(root), "error": error}]
        if all(state == "done" for state in states):
            seconds = round(time.monotonic() - started, 2)
            return OK, [{"step": step, "out": str(root), "ranks": ranks, "seconds": seconds}]
        time.sleep(0.05)
    return PROBLEM, [{"step": step, "out": str(root), "error": f"not written within {timeout_s:.0f} s: {states}"}]


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
